"""The driver: connects the stages through their manifests.

Each ``run_<stage>`` opens ``runs/<run>/<stage>/`` with what the stage reads (input stages,
recipe files, raw inputs, a tokenizer or benchmark directory), returns early when the stage is
current (same config, same content read, outputs intact: ``steelworks.core.rundir``),
otherwise does the work (on Ray) and writes the manifest last. The driver only gathers config
and launches (docs/architecture.md, principle 8).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from steelworks.core.atomic import atomic_write_json, sha256_file
from steelworks.core.config import ConfigError, to_dict
from steelworks.core.rundir import Stage, list_outputs, read_manifest
from steelworks.platform.settings import STAGES, PipelineConfig

log = logging.getLogger("steelworks.pipeline")


# A pretrained_dir may be a whole model directory: its weights (GBs, and not read by the
# tokenizer) stay out of the tokenizer stage's key.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def _open(cfg: PipelineConfig, name: str, config: dict[str, Any], inputs: list[str],
          reads: list[Path] | None = None, raw_inputs: list[str] | None = None) -> Stage:
    stage = Stage.open(cfg.runs_dir, cfg.run, name, config, inputs, reads or [], raw_inputs or [])
    # Take the cache key now, before the work: the manifest must record what the work started
    # from, not a recipe edited while it ran (rundir's docstring).
    stage.fingerprint  # noqa: B018
    return stage


def tokenizer_files(directory: str) -> list[Path]:
    """The files a pretrained tokenizer is loaded from, for the tokenizer stage's key: every
    top-level file of the directory (transformers reads no sub-directory), weights excepted.
    A missing directory is returned as is, for the key's error to name it."""
    d = Path(directory)
    if not d.is_dir():
        return [d]
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(_WEIGHT_SUFFIXES))


def tokenizer_source(cfg: PipelineConfig) -> str | None:
    """The pretrained tokenizer this run uses, or None to train one: ``tokenizer.pretrained_dir``
    or the base model a train stage starts from (``init_from``), whose embedding was trained on
    that tokenizer's ids. Two different ones are an error: a model fed another tokenizer's ids
    learns noise. Tokenizers are compared by their tokenizer.json, so the same files in two
    places agree."""
    sources = {"tokenizer.pretrained_dir": cfg.tokenizer.pretrained_dir}
    for name in ("pretrain", "sft", "dpo"):
        if name in cfg.stages:
            sources[f"{name}.init_from"] = getattr(cfg, name).init_from
    given = {key: d for key, d in sources.items() if d}
    by_tokenizer: dict[str, list[str]] = {}
    for key, d in given.items():
        vocab = Path(d) / "tokenizer.json"
        digest = sha256_file(vocab) if vocab.exists() else str(Path(d).resolve())
        by_tokenizer.setdefault(digest, []).append(f"{key}={d}")
    if len(by_tokenizer) > 1:
        raise ConfigError("the run names different tokenizers: " + "; ".join(
            " and ".join(keys) for keys in by_tokenizer.values()) + ". A base model must be "
            "trained and fine-tuned with its own tokenizer: drop tokenizer.pretrained_dir "
            "(the base model's is used) or point everything at one model directory")
    return next(iter(given.values()), None)


def _skip(stage: Stage, force: bool) -> bool:
    if not force and stage.is_current():
        log.info("stage %s is up to date (%s); skipping (--force re-runs)", stage.name, stage.dir)
        return True
    stage.invalidate()
    return False


def data_stage_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The data stage's config for its key: ``data`` without what only the tokenizer stage
    uses (``mix``, each source's ``ratio``), so changing a mix re-packs and never re-cleans."""
    data = to_dict(cfg.data)
    data.pop("mix", None)
    for src in data.get("sources", []):
        src.pop("ratio", None)
    return data


def mix_ratios(cfg: PipelineConfig) -> dict[str, float | None]:
    """Each pretraining source's target share (the demo corpus is one source, no ratio)."""
    if cfg.data.source == "demo":
        return {"demo": None}
    return {s.name: s.ratio for s in cfg.data.sources}


def run_data(cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    from steelworks.data.clean import check_accounting, files_read, run_clean
    from steelworks.data.config import SourceConfig

    recipe_files, raw_files = files_read(cfg.data)
    # Decontamination reads its benchmark directories (small: CSVs), keyed on all they hold.
    bench = [Path(d) for d in cfg.data.decontam.benchmarks] if cfg.data.decontam.enabled else []
    stage = _open(cfg, "data", data_stage_config(cfg), [], reads=recipe_files + bench,
                  raw_inputs=raw_files)
    if _skip(stage, force):
        return read_manifest(stage.dir)
    extra: dict[str, Any] = {}
    outputs: list[str] = []
    sources, sft_sources = list(cfg.data.sources), list(cfg.data.sft_sources)
    if cfg.data.source == "demo":
        from steelworks.data.demo_corpus import generate

        summary = generate(cfg.data.demo, stage.dir / "corpus")
        outputs += [f"corpus/{f}" for f in summary["files"]]
        corpus = stage.dir / "corpus"
        sources = [SourceConfig(name="demo", path=str(corpus / "pretrain.jsonl"))]
        sft_sources = [SourceConfig(name="demo_sft", path=str(corpus / "sft.jsonl"), format="openai")]
        extra.update(exam="corpus/exam", preference="corpus/preference.jsonl",
                     demo={k: v for k, v in summary.items() if k != "files"})
    elif cfg.data.self_cognition.samples:
        from steelworks.core.atomic import atomic_write_text
        from steelworks.data.sft_builders import self_cognition

        sc = cfg.data.self_cognition
        records = self_cognition(sc.name, sc.author, sc.samples)
        atomic_write_text(stage.path("self_cognition.jsonl"),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        outputs.append("self_cognition.jsonl")
        sft_sources.append(SourceConfig(name="self_cognition", format="openai",
                                        path=str(stage.path("self_cognition.jsonl"))))
    result = run_clean(cfg.data, sources, sft_sources, stage.dir)
    check_accounting(result["counts"])
    outputs += result["outputs"]
    log.info("data: %s", result["totals"])
    for name, c in result["counts"].items():
        log.info("  %-16s %s", name, c)
    extra["ratios"] = {s.name: s.ratio for s in sources}
    metrics = {"counts": result["counts"], "totals": result["totals"]}
    if "decontam" in result:  # per benchmark: what was checked, documents matched, examples
        metrics["decontam"] = result["decontam"]
        log.info("  decontam (%s): %d document(s) %s", result["decontam"]["action"],
                 result["decontam"]["docs"],
                 {b: v["docs"] for b, v in result["decontam"]["benchmarks"].items()})
    return stage.finish(outputs, metrics=metrics, extra=extra, reports=result["reports"])


def run_tokenizer(cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from steelworks.data.pack import build_sft, pack_pretrain
    from steelworks.data.tokenizer import load_tokenizer, tokenizer_summary, train_tokenizer

    source = tokenizer_source(cfg)  # a pretrained tokenizer (or a base model's), or None: train one
    pretrained = tokenizer_files(source) if source else []
    stage = _open(cfg, "tokenizer", {"tokenizer": to_dict(cfg.tokenizer), "pack": to_dict(cfg.pack),
                                     "mix": to_dict(cfg.data.mix), "ratios": mix_ratios(cfg)},
                  ["data"], reads=pretrained)
    if _skip(stage, force):
        return read_manifest(stage.dir)
    data = stage.input_manifest("data")
    data_dir = stage.inputs["data"]
    clean = sorted(data_dir / f for f in data["outputs"] if f.startswith("clean/"))
    sft = sorted(data_dir / f for f in data["outputs"] if f.startswith("sft/"))
    tok_dir = stage.dir / "tokenizer"
    if source:
        tok = load_tokenizer(source)
        tok.save_pretrained(tok_dir)  # with its chat template: SFT chats are encoded with it
    else:
        def texts():  # a bounded sample, streamed from the cleaned shards
            n = 0
            for f in clean:
                for t in pq.read_table(f, columns=["text"]).column("text").to_pylist():
                    if n >= cfg.tokenizer.max_training_docs:
                        return
                    n += 1
                    yield t
        tok = train_tokenizer(texts(), cfg.tokenizer.vocab_size, tok_dir, cfg.tokenizer.min_frequency)
    vocab, pad = len(tok), tok.pad_token_id
    if stage.remote is not None:
        # Packing workers on other nodes load the tokenizer from the bucket: upload it now, its
        # marker last (pack.TOKENIZER_MARKER), and start the shards from an empty prefix.
        from steelworks.data.pack import TOKENIZER_MARKER

        stage.remote.delete("shards")
        stage.remote.child("tokenizer").push(
            tok_dir, [str(f.relative_to(tok_dir)) for f in sorted(tok_dir.rglob("*")) if f.is_file()],
            last=TOKENIZER_MARKER)
    metrics: dict[str, Any] = {"tokenizer": tokenizer_summary(tok_dir)}
    if clean:
        metrics["pretrain"] = pack_pretrain(
            clean, tok_dir, stage.dir / "shards" / "pretrain", cfg.pack.seq_len,
            cfg.pack.sequences_per_shard, vocab, pad, ratios=mix_ratios(cfg),
            mix=cfg.data.mix)
    if sft:
        metrics["sft"] = build_sft(sft, tok_dir, stage.dir / "shards" / "sft", cfg.pack.sft_seq_len,
                                   cfg.pack.sequences_per_shard, vocab, pad, pack=cfg.pack.sft_pack)
    log.info("tokenizer: %s", {k: v for k, v in metrics.items() if k != "tokenizer"})
    outputs = list_outputs(stage.dir)
    return stage.finish(outputs, metrics=metrics, in_bucket=_already_uploaded(stage, outputs))


def _already_uploaded(stage: Stage, outputs: list[str]) -> list[str]:
    """The tokenizer stage's outputs in the bucket already: the tokenizer (uploaded before
    packing) and the shards the packing workers uploaded (named by their content, so the same
    name and size is the same file)."""
    if stage.remote is None:
        return []
    sizes = stage.remote.listing()
    return [rel for rel in outputs if sizes.get(rel) == (stage.dir / rel).stat().st_size
            and (rel.startswith("tokenizer/") or Path(rel).name.startswith("shard-"))]


def _settle_resume(stage: Stage, name: str, tcfg: Any, restart: bool) -> None:
    """Resume this train stage's checkpoints, or start it over when asked to (``restart``);
    never delete them otherwise (train/resume.py): a change that cannot resume, or fewer
    steps than already trained, is a ``ResumeConflict`` naming the fields."""
    from steelworks import __version__
    from steelworks.train.checkpoint import latest_checkpoint, latest_remote_checkpoint
    from steelworks.train.resume import (
        KEY_FILE,
        WIPED,
        ResumeConflict,
        conflict_message,
        conflicts,
        make_key,
        read_key,
    )

    key = make_key(stage.config, stage.input_hashes, __version__)
    remote = stage.remote
    if restart:
        gone = [d for d in WIPED if (stage.dir / d).exists()]
        for d in gone:
            p = stage.dir / d
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if remote is not None:  # the bucket is the run: there above all
            for d in WIPED:
                remote.delete(d)
        log.warning("stage %s: --restart: removed %s from %s; training starts at step 0", name,
                    ", ".join(gone) or "nothing (no earlier training)", stage.location)
    if remote is None:
        last = latest_checkpoint(stage.dir / "checkpoints")
    else:  # the bucket's checkpoints and key, wherever the earlier run went
        last = stage.dir / "checkpoints" / found if (found := latest_remote_checkpoint(
            remote.child("checkpoints"))) else None
        (stage.dir / KEY_FILE).unlink(missing_ok=True)
        if remote.exists(KEY_FILE):
            remote.download(KEY_FILE, stage.dir / KEY_FILE)
    command = f"steelworks {name}"
    if last is not None:
        old = read_key(stage.dir)
        if old is None:
            # Checkpoints from before keys were kept per field (a fingerprint.txt hash): the
            # fields cannot be compared. Adopt them, loudly, rather than delete them.
            log.warning("stage %s: %s has checkpoints but no %s (made by an older steelworks); "
                        "resuming them as if this config made them", name, stage.dir, KEY_FILE)
        else:
            changes = conflicts(old, key)
            if changes:
                raise ResumeConflict(conflict_message(name, stage.dir, last, changes, command))
            if old.get("version") != key["version"]:
                log.warning("stage %s: resuming checkpoints made by steelworks %s with %s", name,
                            old.get("version"), key["version"])
        done = int(last.name.split("_")[1])
        if tcfg.epochs is None and tcfg.max_steps < done:
            raise ResumeConflict(
                f"stage {name}: {name}.max_steps={tcfg.max_steps} is below the {done} steps "
                f"already trained ({last}). Nothing was deleted. Set max_steps >= {done} to "
                f"resume, or start over with `{command} --restart`.")
        log.info("stage %s: resuming from %s", name, f"{remote.uri}/checkpoints/{last.name}"
                 if remote is not None else last)
    atomic_write_json(stage.dir / KEY_FILE, key)
    if remote is not None:
        remote.upload(stage.dir / KEY_FILE, KEY_FILE)
    (stage.dir / "fingerprint.txt").unlink(missing_ok=True)  # the older, hashed key


# Each train stage starts from the HF export of the one before it, unless init_from names
# an external model (then that stage is not needed: ``stages:`` may leave it out).
_STARTS_FROM = {"pretrain": None, "sft": "pretrain", "dpo": "sft"}


def preference_files(cfg: PipelineConfig) -> list[str] | None:
    """The dpo stage's preference files: ``dpo.data``, or None for the demo corpus's
    preference.jsonl (read from the data stage)."""
    if cfg.dpo.data:
        return [str(Path(f).resolve()) for f in cfg.dpo.data]  # quarantine entries name them in full
    if cfg.data.source != "demo":
        raise ConfigError("dpo.data is empty: list the preference JSONL files to train on "
                          "({prompt | messages, chosen, rejected} per line), e.g. "
                          "--set dpo.data=[prefs.jsonl]")
    return None


def _run_train_stage(cfg: PipelineConfig, name: str, force: bool, restart: bool = False) -> dict[str, Any]:
    tcfg = getattr(cfg, name)
    base = tcfg.init_from  # an external HF model to start from, else ours
    if name == "pretrain" and tcfg.lora is not None and not base:
        # Said here, before a stage directory or a Ray job exists (the loop says it too).
        raise ConfigError("pretrain.lora is set, but pretraining starts from scratch: LoRA "
                          "adapts a trained base model. Set sft.lora instead (SFT starts from "
                          "the pretrain stage's hf/), pretrain.init_from, or remove pretrain.lora.")
    previous = None if base else _STARTS_FROM[name]
    inputs = ["tokenizer"] + ([previous] if previous else [])
    prefs = preference_files(cfg) if name == "dpo" else []
    if name == "dpo" and prefs is None:
        inputs.append("data")  # the demo corpus's preference.jsonl
    # Keyed on the base's config and tokenizer files, not its weights (GBs to hash on every
    # run): replacing weights in place under the same config needs --restart. Preference
    # files are keyed like corpus files (size + mtime): they can be GBs.
    stage = _open(cfg, name, to_dict(tcfg), inputs, reads=tokenizer_files(base) if base else [],
                  raw_inputs=prefs or [])
    # --force re-runs a train stage from its checkpoints (a finished one just exports again);
    # only --restart starts it over.
    if not (force or restart) and stage.is_current():
        log.info("stage %s is up to date (%s); skipping (--force re-runs)", name, stage.dir)
        return read_manifest(stage.dir)
    if base:
        from steelworks.data.tokenizer import load_tokenizer
        from steelworks.train.hf_io import check_base_model

        # A missing file or a foreign tokenizer, named before anything in the stage changes.
        check_base_model(base, len(load_tokenizer(stage.inputs["tokenizer"] / "tokenizer")))
        log.info("stage %s starts from %s (%s.model is not used)", name, base, name)
    _settle_resume(stage, name, tcfg, restart)  # before invalidating: a refusal changes nothing
    stage.invalidate()
    tok_dir = stage.inputs["tokenizer"]
    # Absolute: Ray Train's workers (and the reference actors) do not run in this directory,
    # so a base named relative to it would not be found there.
    init_from = str(Path(base).resolve()) if base else (
        str(stage.inputs[previous] / "hf") if previous else None)
    job = {"task": name, "train": to_dict(tcfg), "tokenizer_dir": str(tok_dir / "tokenizer"),
           "data_dir": str(tok_dir / "shards" / name), "out_dir": str(stage.dir),
           "init_from": init_from}
    if stage.remote is not None:  # train/remote.py: what each worker fetches, where it writes
        job.update(remote_dir=stage.remote.uri, pull=[[r.uri, str(stage.inputs[n])]
                                                      for n, r in stage.input_remotes.items()])
    extra_metrics: dict[str, Any] = {}
    if name == "dpo":
        if prefs is None:
            prefs = [str(stage.inputs["data"] / stage.input_manifest("data")["preference"])]
        extra_metrics["pairs"] = _dpo_pairs(stage, cfg.dpo, prefs, init_from, job["tokenizer_dir"])
        job["data_dir"] = str(stage.dir / "pairs")
        if stage.remote is not None:
            job["pull_dirs"] = [[stage.remote.child("pairs").uri, job["data_dir"], "key.json"]]
    from steelworks.train.driver import run_training

    summary = run_training(job, tcfg, use_ray=tcfg.num_workers > 0)
    fetched = _fetch_train_outputs(stage)
    reports = ["metrics.jsonl", "loss.png", "summary.json"]  # timings: differ run to run
    # hf/ is what eval and serve read (with LoRA: the merged model); adapter/ the peft adapter
    outputs = list_outputs(stage.dir, "hf")
    if tcfg.lora is not None and tcfg.lora.save_adapter:
        outputs += list_outputs(stage.dir, "adapter")
    if name == "dpo":
        outputs += list_outputs(stage.dir, "pairs")
    return stage.finish(outputs + reports, metrics={**summary, **extra_metrics}, reports=reports,
                        in_bucket=fetched)


def _fetch_train_outputs(stage: Stage) -> list[str]:
    """A run in a bucket: the exports and reports that rank 0 uploaded (it may have run on
    another node), fetched into this node's mirror; -> their paths, already in the bucket."""
    from steelworks.train.remote import OUTPUT_DIRS, REPORTS

    if stage.remote is None:
        return []
    for d in OUTPUT_DIRS:  # this node's copy from an earlier run is not this run's export
        shutil.rmtree(stage.dir / d, ignore_errors=True)
    files = [rel for rel in stage.remote.listing() if rel.split("/")[0] in OUTPUT_DIRS or rel in REPORTS]
    for rel in files:
        stage.remote.download(rel, stage.dir / rel)
    return files


def _dpo_pairs(stage: Stage, dcfg: Any, files: list[str], reference: str, tokenizer_dir: str
               ) -> dict[str, Any]:
    """``dpo/pairs/``: the tokenized pairs with the reference model's log-probs, built once
    and reused while their key holds (``train.reference.build_pairs``)."""
    from steelworks.train.reference import build_pairs

    remote = stage.remote.child("pairs") if stage.remote is not None else None
    return build_pairs(stage.dir / "pairs", remote, dcfg, files, reference, tokenizer_dir,
                       stage.input_hashes)


def run_pretrain(cfg: PipelineConfig, force: bool = False, restart: bool = False) -> dict[str, Any]:
    return _run_train_stage(cfg, "pretrain", force, restart)


def run_sft(cfg: PipelineConfig, force: bool = False, restart: bool = False) -> dict[str, Any]:
    return _run_train_stage(cfg, "sft", force, restart)


def run_dpo(cfg: PipelineConfig, force: bool = False, restart: bool = False) -> dict[str, Any]:
    return _run_train_stage(cfg, "dpo", force, restart)


def final_model_stage(cfg: PipelineConfig) -> str:
    """The train stage whose hf/ the eval and serve stages use: dpo when the run has it."""
    return "dpo" if "dpo" in cfg.stages else "sft"


def eval_uses_ray(cfg: PipelineConfig) -> bool:
    """Whether the eval stage spreads over Ray Data replicas, or runs in this process.

    Ray only pays when it adds something: more than one replica, or a cluster to place the
    replica on (a submitted job's driver may sit on a head node without the accelerator).
    One replica on this machine is the same computation as ``runner.evaluate_model_dir``
    (both call ``predict_items``), without the seconds Ray spends starting itself, an actor
    that imports torch again, and Ray Data's planning; and that replica would get
    ``cpus_per_replica`` torch threads instead of every core."""
    from steelworks.platform.connect import cluster_attached

    return cfg.eval.replicas > 1 or cluster_attached(cfg.ray.address)


def run_eval(cfg: PipelineConfig, force: bool = False, model_dir: str | None = None) -> dict[str, Any]:
    demo = cfg.eval.benchmark == "demo"  # the demo exam comes from the data stage
    trained = final_model_stage(cfg)
    inputs = (["data"] if demo else []) + ([trained] if model_dir is None else [])
    # An ad-hoc `eval --model DIR` writes eval-<dir>/ so it never overwrites the run's own eval.
    name = "eval" if model_dir is None else "eval-" + "-".join(Path(model_dir).resolve().parts[-2:])
    # A benchmark directory is small (CSVs and the subject mapping): keyed on all it holds.
    reads = [] if demo else [Path(cfg.eval.benchmark)]
    stage = _open(cfg, name, {**to_dict(cfg.eval), "model": model_dir}, inputs, reads=reads)
    if model_dir is None and _skip(stage, force):
        return read_manifest(stage.dir)
    model = model_dir or str(stage.inputs[trained] / "hf")
    if demo:
        data = stage.input_manifest("data")
        if "exam" not in data:
            raise ValueError("eval.benchmark is 'demo' but the data stage did not build the demo exam")
        bench = str(stage.inputs["data"] / data["exam"])
    else:
        bench = cfg.eval.benchmark
    if eval_uses_ray(cfg):
        from steelworks.evals.batch import evaluate_on_ray

        # Scoring runs on eval.replicas Ray Data actors, so a submitted pipeline spreads the
        # benchmark over the cluster; the report is written here, by the driver.
        summary, _ = evaluate_on_ray(model, bench, cfg.eval, stage.dir)
    else:
        import torch

        from steelworks.evals.runner import evaluate_model_dir

        threads = max(1, int(cfg.eval.cpus_per_replica))
        log.info("eval: one replica and no Ray cluster attached: scoring in this process "
                 "(%d torch thread(s): eval.cpus_per_replica)", threads)
        # The CPUs the replica would have had on Ray, as its actor set them.  Scoring is
        # GEMM-bound: intra-op threads beyond the cores that are actually free wait on each
        # other, and on a 2-core machine shared with other work 2 threads ran 4x slower than
        # 1 (benchmarks/RESULTS.md).  More cores: --set eval.cpus_per_replica=N.
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            summary = evaluate_model_dir(model, bench, cfg.eval, stage.dir,
                                         device="cuda" if cfg.eval.gpus_per_replica > 0 else "cpu")
        finally:
            torch.set_num_threads(before)
    return stage.finish(list_outputs(stage.dir), metrics=summary)


def run_serve(cfg: PipelineConfig, model_dir: str | None = None) -> dict[str, Any]:
    """Deploy the SFT model on Ray Serve; optionally ask it who it is; optionally tear down."""
    from steelworks.serve.deployment import deploy, shutdown

    trained = final_model_stage(cfg)
    stage = _open(cfg, "serve", to_dict(cfg.serve), [trained] if model_dir is None else [])
    model = model_dir or str(stage.inputs[trained] / "hf")
    serve_cfg = cfg.serve
    if serve_cfg.model_name is None:
        serve_cfg.model_name = cfg.data.demo.model_name
    url = deploy(model, serve_cfg)
    metrics: dict[str, Any] = {"url": url, "model": model}
    if serve_cfg.smoke_test:
        metrics["smoke_test"] = _ask(url, serve_cfg, "你是谁？")
    if not serve_cfg.keep_running:
        shutdown()
    atomic_write_json(stage.dir / "serve.json", metrics)
    return stage.finish(["serve.json"], metrics=metrics)


def _ask(url: str, cfg, question: str) -> dict[str, str]:
    import urllib.request

    body = {"model": cfg.model_name, "messages": [{"role": "user", "content": question}],
            "max_tokens": 64, "temperature": 0}
    headers = {"Content-Type": "application/json"}
    if key := cfg.resolve_api_key():  # the config's key, else $STEELWORKS_API_KEY
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        reply = json.loads(r.read())["choices"][0]["message"]["content"]
    return {"question": question, "answer": reply}


RUNNERS = {"data": run_data, "tokenizer": run_tokenizer, "pretrain": run_pretrain, "sft": run_sft,
           "dpo": run_dpo, "eval": run_eval}
TRAIN_STAGES = ("pretrain", "sft", "dpo")


def run_pipeline(cfg: PipelineConfig, force: bool = False,
                 restart: bool = False) -> dict[str, dict[str, Any]]:
    """Run ``cfg.stages`` in order. ``restart``: the train stages start over (their
    checkpoints are removed, see ``_settle_resume``); other stages are unaffected."""
    results = {}
    for name in STAGES:
        if name not in cfg.stages:
            continue
        log.info("=== stage %s ===", name)
        if name == "serve":
            results[name] = run_serve(cfg)
        elif name in TRAIN_STAGES:
            results[name] = RUNNERS[name](cfg, force=force, restart=restart)
        else:
            results[name] = RUNNERS[name](cfg, force=force)
    return results


def summarize(cfg: PipelineConfig, results: dict[str, dict[str, Any]]) -> str:
    from steelworks.core.rundir import run_dir
    from steelworks.core.storage import is_uri, location

    root = location(cfg.runs_dir, cfg.run)  # a path, or the run's URI in its bucket
    lines = ["", "=" * 64, f"steelworks run '{cfg.run}' finished: artifacts in {root}/"]
    if is_uri(cfg.runs_dir):
        lines.append(f"  (this machine's copy: {run_dir(cfg.runs_dir, cfg.run)}/)")
    for name in results:
        lines.append(f"  {name:<10} {root}/{name}/manifest.json")
    if "data" in results:
        lines.append(f"data: {results['data']['metrics'].get('totals')}")
        if any(f.startswith("plots/") for f in results["data"].get("outputs", {})):
            lines.append(f"  filter-stat histograms: {root}/data/plots/")
    if "tokenizer" in results:
        m = results["tokenizer"]["metrics"]
        if "pretrain" in m:
            p = m["pretrain"]
            lines.append(f"shards: {p['sequences']} x {cfg.pack.seq_len} tokens in {p['shards']} "
                         f"shard(s); source shares {p.get('achieved_shares')}")
        if "sft" in m:
            lines.append(f"sft: {m['sft']['samples']} samples {m['sft']['task_types']}")
    if "pretrain" in results:
        lines.append(f"pretrain: final loss {results['pretrain']['metrics'].get('loss', float('nan')):.3f}")
    if "sft" in results:
        lines.append(f"sft: final loss {results['sft']['metrics'].get('loss', float('nan')):.3f}")
    if "dpo" in results:
        m = results["dpo"]["metrics"]
        lines.append(f"dpo: final loss {m.get('loss', float('nan')):.3f}, reward accuracy "
                     f"{m.get('rewards/accuracies', float('nan')):.1%}, margin "
                     f"{m.get('rewards/margins', float('nan')):.3f} on {m['pairs']['pairs']} pairs "
                     f"({m['pairs']['quarantined']} quarantined)")
    if "eval" in results:
        ev = results["eval"]["metrics"]
        lines.append(f"eval: accuracy {ev['micro_acc']:.1%} on {ev['n']} questions "
                     f"({cfg.eval.scoring} scoring; chance 25%); "
                     f"report: {root}/{results['eval']['stage']}/report.md")
    if "serve" in results and "smoke_test" in results["serve"]["metrics"]:
        s = results["serve"]["metrics"]["smoke_test"]
        lines.append(f"chat: Q: {s['question']}  A: {s['answer']}")
    sft = run_dir(cfg.runs_dir, cfg.run) / final_model_stage(cfg) / "hf"  # a local copy
    if not sft.exists():
        return "\n".join([*lines, "=" * 64])
    lines += ["", "Chat with the model (after `source .venv/bin/activate`):",
              f"  steelworks serve --model {sft}",
              "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
              "    -d '{\"model\": \"" + str(cfg.serve.model_name or cfg.data.demo.model_name) +
              "\", \"messages\": [{\"role\": \"user\", \"content\": \"你是谁？\"}]}'", "=" * 64]
    return "\n".join(lines)
