"""Worker faults on Ray Data and Ray Serve: a filtering worker and a serving replica killed.

1. A Ray Data worker dies (``os._exit``, no cleanup) while it applies the quality filters.
   The fault is ``core.faults``' ``data.clean`` point, armed in the driver's environment by
   the ``inject_faults`` fixture: the driver reads it and hands it to the filtering tasks as
   an argument, so it works on the session's
   already-running local cluster, whose workers never see an env var set now. Ray Data
   submits map tasks with ``max_retries=-1`` and ``RaySystemError`` among the retried
   exceptions (ray/data/_internal/remote_fn.py, ``cached_remote_fn``; task_pool_map_operator
   builds its task with it), and a dead worker is a system failure, retried whatever
   ``retry_exceptions`` says; so the stage recovers with no setting of ours. The test checks
   that the worker really died, that Ray recorded the failed attempt and its retry, and that
   the data stage's outputs are byte-identical to a clean run's. (They were not at first:
   the retry shifts timing, which moved parquet row-group boundaries and the row order of
   the filter-stats file; clean.py now writes both deterministically.) The tokenizer stage
   is left out: its packing runs after the fault on identical files and would add ~30 s
   per run on a 2-core machine.

2. A Ray Serve replica is killed (``ray.kill(..., no_restart=True)``) under a bounded
   concurrent load of streaming and non-streaming chat requests. The controller notices
   when the replica's health-check call fails with ``RayActorError`` (serve/_private/
   deployment_state.py ``_check_active_health_check``; a check every
   ``health_check_period_s``, 10 s by default), stops it and starts a replacement
   (measured here: ~20 s from kill to RUNNING, most of it the new replica loading torch and
   the model); meanwhile the proxy's router drops the dead replica as soon as a call to it
   fails with ``ActorDiedError`` (serve/_private/router.py, "will not be considered for
   future requests") and routes to the survivor. The test checks that nothing hangs,
   that errors stay within a budget, that requests succeed again, and that the deployment is
   back to HEALTHY with two RUNNING replicas, one of them new.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from steelworks.data.config import (
    DataConfig,
    DedupConfig,
    MinHashConfig,
    SourceConfig,
)
from steelworks.platform.settings import PipelineConfig

pytestmark = [pytest.mark.faults, pytest.mark.ray]


# ----------------------------------------------------------------------------- data stage


def _corpus(root: Path) -> Path:
    """A tiny deterministic corpus: two text sources (the web one split over three files, so
    the filtering runs in several tasks), exact duplicates across files, junk the filters
    drop, a malformed line, and an SFT source. Written once, read by both runs, so the
    ``path`` column (and with it every output byte) is the same in both."""
    cities = ["北京", "上海", "广州", "成都", "杭州", "西安", "南京", "武汉"]
    foods = ["面条", "米饭", "饺子", "包子", "火锅", "豆腐"]
    web = root / "web"
    web.mkdir(parents=True)
    docs = [f"第{i}篇文章。{cities[i % 8]}是一座历史悠久的城市，那里的人们喜欢吃{foods[i % 6]}。\n"
            f"每年有{100 + 7 * i}万游客来到{cities[(i * 3) % 8]}，参观博物馆和公园。"
            for i in range(90)]
    for k in range(3):
        lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs[30 * k: 30 * (k + 1)]]
        lines += [json.dumps({"text": docs[k]}, ensure_ascii=False),  # exact duplicate
                  json.dumps({"text": "短"}, ensure_ascii=False),  # too short
                  json.dumps({"text": "哈" * 60}, ensure_ascii=False)]  # repetitive
        (web / f"part{k}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    notes = [json.dumps({"text": f"Note {i}: the river near town {i % 5} floods every spring."})
             for i in range(40)]
    notes.insert(7, '{"text": "broken JSON"')  # quarantined with file and line
    (root / "notes.jsonl").write_text("\n".join(notes) + "\n", encoding="utf-8")
    chats = [json.dumps({"messages": [{"role": "user", "content": f"{c}在哪里？"},
                                      {"role": "assistant", "content": f"{c}在中国。"}]},
                        ensure_ascii=False) for c in cities]
    (root / "sft.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
    return root


def _config(runs: Path, run: str, corpus: Path) -> PipelineConfig:
    data = DataConfig(
        source="files",
        sources=[SourceConfig(name="web", path=str(corpus / "web"), recipe="steel_text"),
                 SourceConfig(name="notes", path=str(corpus / "notes.jsonl"))],
        sft_sources=[SourceConfig(name="chat", path=str(corpus / "sft.jsonl"), format="openai")],
        # Exact dedup on: the retried task's rows must land in the same groups of the
        # shuffle after it. MinHash off: its dozen extra Ray Data jobs cost ~2 minutes here
        # and run after the filtering, on its output, so they add nothing to this fault.
        dedup=DedupConfig(exact=True, minhash=MinHashConfig(enabled=False)),
    )
    return PipelineConfig(run=run, runs_dir=str(runs), stages=["data"], data=data)


def _kept_ids(stage_dir: Path) -> list[tuple[str, str, int]]:
    import pandas as pd

    files = sorted((stage_dir / "clean").glob("*.parquet"))
    df = pd.concat([pd.read_parquet(f, columns=["source", "path", "line"]) for f in files])
    return [(s, Path(p).name, int(n)) for s, p, n in df.itertuples(index=False)]


def _ray_record_of_fault(pid: int, wait_s: float = 20.0) -> tuple[dict, list[dict]]:
    """Ray's own record of the fault: the worker with ``pid`` and its exit, and every attempt
    of the filtering task that died with it. Task events reach the GCS about once a second,
    hence the polling. A worker killed within a second of starting the task never flushed
    its own events, so the failed attempt (reported by the owner) may lack ``worker_pid``:
    it is found by its error type and name instead (this cluster runs nothing else)."""
    import ray
    from ray.util.state import list_tasks, list_workers

    # This cluster's address: without one the state API looks for a cluster on the machine
    # and fails when another one (someone else's) runs beside it.
    address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + wait_s
    while True:
        workers = list_workers(address=address, filters=[("pid", "=", pid)], detail=True,
                               raise_on_missing_output=False)
        worker = next((w for w in workers if w.get("exit_type")), {})
        died = [t for t in list_tasks(address=address, filters=[("error_type", "=", "WORKER_DIED")],
                                      detail=True, raise_on_missing_output=False)
                if "apply_recipe" in t["name"] and t.get("worker_pid") in (None, pid)]
        attempts = list_tasks(address=address, filters=[("task_id", "=", died[0]["task_id"])],
                              detail=True, raise_on_missing_output=False) if died else []
        done = worker and any(a["state"] == "FINISHED" for a in attempts)
        if done or time.monotonic() > deadline:
            return worker, attempts
        time.sleep(0.5)


def test_killed_data_worker_changes_no_output(ray_local, tmp_path, inject_faults):
    import psutil

    from steelworks.core.faults import fault
    from steelworks.platform.pipeline import run_data

    corpus = _corpus(tmp_path / "corpus")
    runs = tmp_path / "runs"
    clean_cfg, faulted_cfg = _config(runs, "clean", corpus), _config(runs, "faulted", corpus)
    t0 = time.monotonic()
    clean = run_data(clean_cfg)
    t1 = time.monotonic()
    marker = tmp_path / "fault.marker"
    inject_faults(fault("data.clean", marker))
    faulted = run_data(faulted_cfg)
    print(f"data stage: clean run {t1 - t0:.1f} s, faulted run {time.monotonic() - t1:.1f} s")

    # The hook fired, in a Ray worker (in this process it would have ended pytest), and that
    # worker is gone: the data came out of a retried task.
    assert marker.exists(), "the fault hook never ran: is the filtering still in apply_recipe?"
    pid = int(marker.read_text().split()[0])
    assert pid != os.getpid() and not psutil.pid_exists(pid)
    # Ray saw it too: the worker exited with a system error, the task's first attempt failed
    # with WORKER_DIED, and a later attempt of the same task finished.
    worker, attempts = _ray_record_of_fault(pid)
    assert worker.get("exit_type") == "SYSTEM_ERROR", worker
    states = sorted((a["attempt_number"], a["state"], a.get("error_type")) for a in attempts)
    assert states and states[0] == (0, "FAILED", "WORKER_DIED"), states
    assert states[-1][0] >= 1 and states[-1][1] == "FINISHED", states

    # Identical outputs: the same documents kept, in the same order, and byte-identical
    # files (the manifest holds the sha256 of every output: cleaned parquet, SFT parquet,
    # quarantine, filter stats, histograms), with the same counts.
    kept = _kept_ids(runs / "clean" / "data")
    assert _kept_ids(runs / "faulted" / "data") == kept and len(kept) > 80
    assert faulted["outputs"] == clean["outputs"]
    assert any(k.startswith("clean/") for k in clean["outputs"]) and "quarantine.jsonl" in clean["outputs"]
    assert faulted["metrics"] == clean["metrics"]
    counts = clean["metrics"]["counts"]
    assert counts["web"]["duplicate"] >= 3 and counts["notes"]["quarantined"] == 1
    assert any(k.startswith("filtered:") for k in counts["web"])


# ----------------------------------------------------------------------------- serve


REQUEST_TIMEOUT_S = 30.0  # per request (the openai client's timeout; streams: per read)
CLIENTS = 4
LOAD_BOUND_S = 90.0  # the whole load phase, replacement included, must end within this
WARMUP_OK = 8  # successful requests before the kill
AFTER_OK = 8  # successful requests started after the replacement was seen RUNNING
SETTLE_S = 60.0  # after the load: how long the deployment may take to be back to 2 RUNNING
APP = "steelworks"  # deploy()'s default application and deployment name
HELLO = [{"role": "user", "content": "你好，你是谁？"}]


@dataclass
class Outcome:
    client: int
    stream: bool
    start: float
    end: float
    error: str | None  # None: a complete reply (finish_reason present)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_actors() -> set[str]:
    """Names of the application's live replica actors (``SERVE_REPLICA::app#deployment#id``
    in the ``serve`` namespace; the id is the replica id)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{APP}#")}


def _deployment_status():
    from ray import serve

    app = serve.status().applications.get(APP)
    return app.deployments[APP] if app else None


def _settled_status(victim: str | None):
    """-> (deployment status, live replica actors, seconds waited) once the deployment is
    HEALTHY with two RUNNING replicas and without ``victim``, or after ``SETTLE_S``."""
    t0 = time.monotonic()
    while True:
        status, actors = _deployment_status(), _replica_actors()
        settled = (status is not None and status.status == "HEALTHY"
                   and status.replica_states == {"RUNNING": 2} and victim not in actors
                   and len(actors) == 2)
        waited = time.monotonic() - t0
        if settled or waited > SETTLE_S:
            return status, actors, (waited if waited > 0.5 else 0.0)
        time.sleep(0.5)


def _one_request(client, stream: bool) -> None:
    """A chat completion that must arrive whole: a stream cut short by a dying replica may
    end without an error, so the final chunk's finish_reason is required."""
    kwargs = dict(model="steel", messages=HELLO, temperature=0, max_tokens=16)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        if not chunks or chunks[-1].choices[0].finish_reason is None:
            raise RuntimeError(f"stream ended without finish_reason after {len(chunks)} chunks")
    else:
        out = client.chat.completions.create(**kwargs)
        if out.choices[0].finish_reason is None:
            raise RuntimeError("reply without finish_reason")


def test_killed_serve_replica_is_replaced_under_load(ray_local, tiny_model_dir):
    import ray
    from openai import OpenAI

    from steelworks.serve.config import ServeConfig
    from steelworks.serve.deployment import deploy, shutdown

    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    url = ""

    def load(i: int) -> None:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                        timeout=REQUEST_TIMEOUT_S)
        n = 0
        while not stop.is_set():
            stream = (i + n) % 2 == 0
            n += 1
            t0 = time.monotonic()
            try:
                _one_request(client, stream)
                error = None
            except Exception as e:  # noqa: BLE001 - every failure is an outcome to count
                error = f"{type(e).__name__}: {e}"[:200]
            with lock:
                outcomes.append(Outcome(i, stream, t0, time.monotonic(), error))

    def wait_for(cond, bound: float, what: str) -> None:
        while not cond():
            assert time.monotonic() < bound, f"load phase passed its bound waiting for {what}"
            time.sleep(0.2)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(CLIENTS)]
    status, after, settle_s = None, set(), 0.0
    victim_state: dict[str, str] = {}
    try:
        # Two replicas of one logical CPU each fit the session's 4-CPU cluster (CPU-only).
        url = deploy(tiny_model_dir, ServeConfig(port=_free_port(), model_name="steel",
                                                 max_tokens=16, num_replicas=2))
        before = _replica_actors()
        assert len(before) == 2, before
        t_begin = time.monotonic()
        bound = t_begin + LOAD_BOUND_S
        for t in threads:
            t.start()
        wait_for(lambda: sum(o.error is None for o in outcomes) >= WARMUP_OK, bound, "warm-up")

        victim = victim_state["victim"] = sorted(before)[0]
        with lock:
            n_before = len(outcomes)
        t_kill = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

        def replaced() -> bool:
            st = _deployment_status()
            now = _replica_actors()
            return (st is not None and st.status == "HEALTHY"
                    and st.replica_states.get("RUNNING") == 2 and victim not in now
                    and len(now) == 2 and len(now - before) == 1)

        wait_for(replaced, bound, "the replacement replica")
        t_replaced = time.monotonic()
        wait_for(lambda: sum(o.error is None and o.start > t_replaced for o in outcomes) >= AFTER_OK,
                 bound, "requests after the replacement")
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:  # started
                t.join(REQUEST_TIMEOUT_S + 5)
        hung = [t.name for t in threads if t.is_alive()]
        try:
            status, after, settle_s = _settled_status(victim_state.get("victim"))
        finally:
            shutdown()
    t_end = time.monotonic()

    assert not hung, f"client threads still blocked after stop: {hung}"
    assert t_end - t_begin - settle_s < LOAD_BOUND_S + REQUEST_TIMEOUT_S + 5
    # No request hung: each finished or failed within its timeout (plus scheduling slack).
    assert max(o.end - o.start for o in outcomes) < REQUEST_TIMEOUT_S + 5
    errors = [o for o in outcomes if o.error]
    # Error budget: only requests in flight around the kill may fail -- at most one per
    # client on the dying replica, plus one per client routed to it before the proxy's
    # router learned it was dead. Nothing before the kill, nothing after the replacement.
    assert len(errors) <= 2 * CLIENTS, [o.error for o in errors]
    assert all(o.end >= t_kill and o.start <= t_replaced for o in errors), errors
    assert all(o.error is None for o in outcomes[:n_before])
    late = [o for o in outcomes if o.start > t_replaced]
    assert len(late) >= AFTER_OK and all(o.error is None for o in late), late
    # The kill hit live traffic, and the surviving replica kept serving while the
    # replacement started (the point of running two).
    in_flight = [o for o in outcomes if o.start < t_kill < o.end]
    assert in_flight, "no request was in flight when the replica was killed"
    assert any(o.error is None and t_kill < o.start and o.end < t_replaced for o in outcomes)
    # Replaced: HEALTHY, two RUNNING replicas, the killed one gone. Normally exactly one new
    # id; on a loaded 2-core CI runner the controller once marked a second replica unhealthy
    # after the replacement (a health check that did not answer in time) and replaced it as
    # well, so the end state is awaited (SETTLE_S) and any extra replacement is printed.
    assert status is not None and status.status == "HEALTHY", (status, settle_s)
    assert status.replica_states == {"RUNNING": 2}, status
    assert victim not in after and len(after) == 2 and len(after - before) >= 1, (before, after)
    if len(after - before) > 1 or settle_s > 0:
        print(f"serve fault: the deployment settled {settle_s:.1f} s after the load stopped; "
              f"new replicas {sorted(after - before)} (one replaces the victim)")
    print(f"serve fault: {len(outcomes)} requests, {len(in_flight)} in flight at the kill, "
          f"{len(errors)} failed "
          f"({sorted({o.error.split(':')[0] for o in errors})}); replaced in "
          f"{t_replaced - t_kill:.1f} s; killed {victim}")
