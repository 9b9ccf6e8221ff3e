"""The end-to-end slice on a tiny config: every stage for real, on one shared Ray session.

data (Ray Data) -> tokenizer (BPE + packed shards) -> pretrain (Ray Train, 2 workers, FSDP2)
-> SFT -> eval (log-likelihood on the demo exam) -> serve (Ray Serve, /v1/chat/completions).
Then: a second run on a "new node" skips every stage, and a changed SFT config re-runs only
SFT and eval, resuming from its checkpoint.

The run lives in a bucket (``runs_dir: s3://...`` on moto's S3 server, conftest.py), the way
a multi-node cluster runs it: the bucket path covers the local one (each process works in a
local mirror of the run, ``root`` below) plus everything that reaches the bucket. Pipelines
with ``runs_dir`` on local disk run in test_init_from.py, test_stage_cache.py and `make demo`.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket

import pytest

from steelworks.core.config import load
from steelworks.core.storage import Remote, mirror_root
from steelworks.platform.settings import PipelineConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = [
    "data.demo.num_entities=12", "data.demo.pretrain_renderings=4",
    "data.demo.sft_questions_per_fact=1", "data.demo.sft_exam_per_fact=1",
    "data.demo.self_cognition_samples=8", "data.demo.dev_per_subject=1",
    "tokenizer.vocab_size=600", "pack.seq_len=64", "pack.sft_seq_len=256",
    "pretrain.model.size=tiny", "pretrain.max_steps=4", "pretrain.micro_batch_size=2",
    "pretrain.num_workers=2", "pretrain.log_every=2", "pretrain.optim.warmup_steps=1",
    "sft.model.size=tiny", "sft.max_steps=3", "sft.micro_batch_size=2", "sft.num_workers=2",
    "sft.log_every=1", "eval.max_items=3", "serve.max_tokens=8",
]


BUCKET = "steelworks-pipeline"
STAGES = ["data", "tokenizer", "pretrain", "sft", "eval", "serve"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local, s3_server):
    """(config, results, the run's local mirror); the bucket is ``bucket(run)``."""
    import pyarrow.fs as pafs

    from steelworks.platform.pipeline import run_pipeline

    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(BUCKET)
    with pytest.MonkeyPatch.context() as mp:  # the mirror, for the whole module
        mp.setenv("STEELWORKS_CACHE", str(tmp_path_factory.mktemp("mirror")))
        cfg = load(PipelineConfig, None, [*TINY, f"runs_dir=s3://{BUCKET}/runs", "run=tiny",
                                          f"serve.port={_free_port()}"])
        yield cfg, run_pipeline(cfg), mirror_root(f"s3://{BUCKET}/runs/tiny")


def bucket(run) -> Remote:
    return Remote(f"s3://{BUCKET}/runs/tiny")


def checkpoints(stage: str) -> list[str]:
    """The complete checkpoints of a train stage, in the bucket (the local mirror is a cache)."""
    remote = Remote(f"s3://{BUCKET}/runs/tiny/{stage}/checkpoints")
    return [d for d in remote.dirs() if d.startswith("step_") and remote.exists(f"{d}/meta.json")]


def test_every_stage_wrote_its_manifest(run):
    cfg, results, root = run
    assert list(results) == STAGES
    for name in results:
        m = json.loads((root / name / "manifest.json").read_text())
        assert m["stage"] == name and m["outputs"]
        for rel, meta in m["outputs"].items():
            assert (root / name / rel).stat().st_size == meta["bytes"], rel


def test_every_artifact_is_in_the_bucket(run):
    """Manifests, cleaned and token shards, tokenizer, both ranks' checkpoint shards, Ray
    Train's storage, exports and reports: all in the bucket, nothing temporary left there."""
    _, results, _ = run
    remote = bucket(run)
    listing = remote.listing()
    for name in STAGES:
        assert remote.read_json(f"{name}/manifest.json") == results[name]
        for rel, meta in results[name]["outputs"].items():
            assert listing.get(f"{name}/{rel}") == meta["bytes"], f"{name}/{rel}"
    assert any(k.startswith("data/clean/part-") for k in listing)
    assert any(k.startswith("tokenizer/shards/pretrain/shard-") for k in listing)
    assert {"tokenizer/tokenizer/tokenizer.json", "sft/hf/model.safetensors", "eval/report.json",
            "pretrain/resume_key.json", "pretrain/checkpoints/checkpoint_manager_snapshot.json"} <= set(listing)
    step = "pretrain/checkpoints/step_00000004"
    assert {f"{step}/__0_0.distcp", f"{step}/__1_0.distcp", f"{step}/.metadata",
            f"{step}/rng_rank1.json", f"{step}/meta.json"} <= set(listing)
    assert not [k for k in listing if ".tmp" in k or ".read_counts" in k]


def test_data_accounting_adds_up(run):
    _, results, root = run
    demo = results["data"]["demo"]["pretrain"]
    totals = results["data"]["metrics"]["totals"]
    counts = results["data"]["metrics"]["counts"]["demo"]
    assert counts["read"] == counts["kept"] + counts["duplicate"] + counts["filtered:text_length"] \
        + counts.get("quarantined", 0)
    assert counts["duplicate"] == demo["planted_duplicates"]
    assert counts["filtered:text_length"] == demo["planted_junk"]
    assert totals["read"] == sum(c["read"] for c in results["data"]["metrics"]["counts"].values())


def test_tokenizer_and_shards_are_standard(run):
    from transformers import AutoTokenizer

    from steelworks.data.shards import ShardIndex, open_shard

    _, results, root = run
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer" / "tokenizer"))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    shard_dir = root / "tokenizer" / "shards" / "pretrain"
    index = ShardIndex.load(shard_dir)
    assert index.num_sequences == results["tokenizer"]["metrics"]["pretrain"]["sequences"] > 0
    tokens, mask = open_shard(shard_dir, index, index.shards[0])
    assert mask is None and tokens.shape[1] == 64 and int(tokens.max()) < len(tok)
    sft = ShardIndex.load(root / "tokenizer" / "shards" / "sft")
    _, sft_mask = open_shard(root / "tokenizer" / "shards" / "sft", sft, sft.shards[0])
    assert sft_mask is not None and 0 < sft_mask.mean() < 1


def test_models_load_in_transformers_and_train(run):
    from transformers import AutoModelForCausalLM

    _, results, root = run
    for name, steps in (("pretrain", 4), ("sft", 3)):
        m = results[name]["metrics"]
        assert m["final_step"] == steps and m["world_size"] == 2 and m["loss"] > 0
        assert m["tokens_per_s"] > 0 and 0 < m["mfu"]
        rows = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == steps
        model = AutoModelForCausalLM.from_pretrained(str(root / name / "hf"))
        assert model.config.num_hidden_layers == 2
    assert (root / "pretrain" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_report(run):
    _, results, root = run
    ev = results["eval"]["metrics"]
    report = json.loads((root / "eval" / "report.json").read_text())
    assert ev["n"] == 4 * 3 and 0 <= ev["micro_acc"] <= 1  # 4 subjects x max_items=3
    assert len(report["predictions"]) == ev["n"]


def test_serve_answered_through_the_endpoint(run):
    _, results, _ = run
    smoke = results["serve"]["metrics"]["smoke_test"]
    assert smoke["question"] == "你是谁？" and isinstance(smoke["answer"], str)
    assert results["serve"]["metrics"]["url"].startswith("http://127.0.0.1:")


def test_adhoc_eval_gets_its_own_stage(run):
    from steelworks.platform.pipeline import run_eval

    cfg, _, root = run
    before = (root / "eval" / "manifest.json").read_text()
    m = run_eval(cfg, model_dir=str(root / "pretrain" / "hf"))
    assert m["stage"] == "eval-pretrain-hf" and m["metrics"]["n"] == 12
    assert (root / "eval-pretrain-hf" / "report.md").exists()
    assert (root / "eval" / "manifest.json").read_text() == before


def test_rerun_on_a_new_node_skips_and_config_change_reruns_downstream(run, caplog):
    """A re-submitted run on a node that has none of the run (its mirror deleted) skips every
    finished stage from the bucket; a longer SFT then resumes from its checkpoint there."""
    from steelworks.platform.pipeline import run_pipeline
    from steelworks.train.resume import ResumeConflict

    cfg, results, root = run
    cfg.stages = STAGES[:-1]
    manifests = {n: bucket(run).read_bytes(f"{n}/manifest.json") for n in cfg.stages}
    shutil.rmtree(root)
    with caplog.at_level(logging.INFO, "steelworks"):
        again = run_pipeline(cfg)
    for name in cfg.stages:
        assert again[name]["ended_at"] == results[name]["ended_at"], f"{name} was re-run"
    assert len([r for r in caplog.records if "is up to date" in r.getMessage()]) == len(cfg.stages)
    assert {n: bucket(run).read_bytes(f"{n}/manifest.json") for n in cfg.stages} == manifests
    assert (root / "sft" / "hf" / "model.safetensors").is_file(), "eval's input was fetched"
    # Shortening a run below what it trained is an error, not a restart: nothing is deleted.
    ckpts = checkpoints("sft")
    before = (root / "sft" / "metrics.jsonl").read_text().splitlines()
    cfg.sft.max_steps = 2
    with pytest.raises(ResumeConflict, match=r"max_steps=2 is below the 3 steps"):
        run_pipeline(cfg)
    assert checkpoints("sft") == ckpts == ["step_00000003"]
    # Extending a run resumes it from its last checkpoint (in the bucket: this node has no
    # copy); only SFT and eval re-run.
    cfg.sft.max_steps = 4
    with caplog.at_level(logging.INFO, "steelworks"):
        extended = run_pipeline(cfg)
    assert f"resuming from {bucket(run).uri}/sft/checkpoints/step_00000003" in caplog.text
    for name in ("data", "tokenizer", "pretrain"):
        assert extended[name]["ended_at"] == results[name]["ended_at"], f"{name} was re-run"
    assert (extended["eval"]["inputs"]["sft"]["content_sha256"]
            != results["eval"]["inputs"]["sft"]["content_sha256"])
    after = (root / "sft" / "metrics.jsonl").read_text().splitlines()
    assert extended["sft"]["metrics"]["final_step"] == 4
    assert after[:3] == before and [json.loads(r)["step"] for r in after] == [1, 2, 3, 4]
    assert bucket(run).read_json("sft/manifest.json") == extended["sft"]


# Two more Ray Train runs (~80 s): in `make test-faults` with the other checkpoint-survival
# tests (`make test` runs this module's other tests; CI runs both targets).
@pytest.mark.faults
def test_train_checkpoints_survive_every_change(run, caplog):
    """Refuse, never delete (train/resume.py): speed settings, shortening and a changed
    learning rate all leave the checkpoints; the first resumes, the others fail naming the
    field; only --restart starts over, and says so. (An identical `data --force` leaves the
    train stages current: tests/test_stage_cache.py.)"""
    import copy

    from steelworks.platform.pipeline import run_pretrain
    from steelworks.train.resume import ResumeConflict

    cfg0, results, root = run

    def state():
        return checkpoints("pretrain"), bucket(run).read_bytes("pretrain/metrics.jsonl")

    start = state()
    assert start[0], "the pretrain stage left no checkpoint"
    cfg = copy.deepcopy(cfg0)
    assert run_pretrain(cfg)["ended_at"] == results["pretrain"]["ended_at"]
    assert state() == start
    # Speed and memory settings resume (a finished run: no step is trained again).
    cfg.pretrain.activation_checkpointing = True
    cfg.pretrain.kernels = ["rmsnorm"]
    cfg.pretrain.micro_batch_size, cfg.pretrain.grad_accum = 1, 2  # same global batch
    with caplog.at_level("INFO", logger="steelworks"):
        resumed = run_pretrain(cfg)
    assert resumed["metrics"]["final_step"] == 4 and "resuming from" in caplog.text
    assert state() == start
    # Shortening below the last checkpoint, and a new learning rate: errors naming the field.
    short = copy.deepcopy(cfg)
    short.pretrain.max_steps = 2
    with pytest.raises(ResumeConflict, match="max_steps=2"):
        run_pretrain(short)
    new_lr = copy.deepcopy(cfg)
    new_lr.pretrain.optim.lr = 1e-4
    with pytest.raises(ResumeConflict) as err:
        run_pretrain(new_lr)
    assert "optim.lr: 0.0003 -> 0.0001" in str(err.value) and "--restart" in str(err.value)
    assert state() == start
    # A refusal changes nothing at all: the stage is still up to date with its own config.
    assert run_pretrain(cfg)["ended_at"] == resumed["ended_at"]
    # --restart wipes (in the log) and trains from step 0 with the new learning rate.
    caplog.clear()
    with caplog.at_level("WARNING", logger="steelworks"):
        restarted = run_pretrain(new_lr, restart=True)
    assert "--restart: removed checkpoints" in caplog.text
    rows = [json.loads(r) for r in (root / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert restarted["metrics"]["final_step"] == 4 and [r["step"] for r in rows] == [2, 4]
    assert [json.loads(x) for x in bucket(run).read_bytes("pretrain/metrics.jsonl").splitlines()] == rows
    assert bucket(run).read_json("pretrain/resume_key.json")["config"]["optim.lr"] == 1e-4
