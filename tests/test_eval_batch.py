"""Evaluation modes and the Ray Data batch runner: however a benchmark is spread over
replicas, and in either scoring mode, the predictions are those of one in-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evals import ceval_dir  # noqa: F401  (the hand-made C-Eval-layout fixture)

from steelworks.evals.batch import evaluate_on_ray
from steelworks.evals.config import EvalConfig
from steelworks.evals.runner import evaluate, load_items


@pytest.fixture(scope="module")
def shaken(shaken_model_dir: Path):
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.models import load_model

    return load_model(shaken_model_dir), load_tokenizer(shaken_model_dir)


def _same(a: list[dict], b: list[dict]) -> None:
    assert [(r["subject"], r["id"], r["pred"]) for r in a] == \
        [(r["subject"], r["id"], r["pred"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        if ra["scores"] is None:
            assert rb["scores"] is None and ra["reply"] == rb["reply"]
        else:  # batch composition differs between the runs: float noise only
            assert ra["scores"] == pytest.approx(rb["scores"], abs=1e-4)


@pytest.mark.parametrize("cfg", [
    EvalConfig(split="val", num_shots=1, chat=True, batch_size=2),
    EvalConfig(split="val", mode="generative", chat=False, max_new_tokens=6, batch_size=3),
], ids=["loglik-1shot-chat", "generative-base"])
def test_ray_replicas_match_in_process(cfg: EvalConfig, shaken, shaken_model_dir: Path,
                                       ceval_dir: Path, ray_local, tmp_path: Path) -> None:  # noqa: F811
    model, tok = shaken
    expected_summary, expected = evaluate(model, tok, ceval_dir, cfg)
    assert len(expected) == 5  # every val item of the fixture, so the comparison is not vacuous

    cfg.replicas = 2
    summary, got = evaluate_on_ray(shaken_model_dir, ceval_dir, cfg, tmp_path / "eval")
    _same(got, expected)
    assert summary["micro_acc"] == expected_summary["micro_acc"]
    report = json.loads((tmp_path / "eval" / "report.json").read_text("utf-8"))
    assert [r["id"] for r in report["predictions"]] == [r["id"] for r in expected]
    assert report["summary"]["meta"]["config"]["replicas"] == 2


def test_generative_mode_counts_and_reports_unparseable(shaken, ceval_dir: Path,  # noqa: F811
                                                        tmp_path: Path) -> None:
    from steelworks.evals.generative import predict_generative
    from steelworks.evals.report import write_report
    from steelworks.inference.engine import Engine

    model, tok = shaken
    cfg = EvalConfig(split="val", mode="generative", chat=True, max_new_tokens=4)
    summary, records = evaluate(model, tok, ceval_dir, cfg)
    # The runner's generative mode is predict_generative on an in-process engine.
    subjects, items, shots = load_items(ceval_dir, cfg)
    engine = Engine(model, tok, max_batch_size=4)
    try:
        direct = predict_generative(engine, items, subjects, cfg, shots, max_tokens=4)
    finally:
        engine.shutdown()
    assert [r["reply"] for r in records] == [r["reply"] for r in direct]
    # A shaken random model rarely writes a readable letter: whatever it wrote is counted,
    # and the unparseable ones are wrong, not dropped from the denominator.
    unparseable = summary["unparseable"]
    assert unparseable["n"] == 5 and unparseable["unparseable"] == sum(not r["parsed"] for r in records)
    assert summary["n"] == 5
    assert summary["micro_acc"] == sum(bool(r["correct"]) for r in records) / 5
    write_report(summary, records, tmp_path)
    markdown = (tmp_path / "report.md").read_text("utf-8")
    assert "## Unparseable replies" in markdown
    assert f"{unparseable['unparseable']} of 5 replies had no readable answer" in markdown


def test_eval_command_scores_in_process_without_ray(shaken, shaken_model_dir: Path,
                                                    ceval_dir: Path, tmp_path: Path,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`steelworks eval` with one replica and no cluster attached never starts Ray, and its
    report holds the predictions of the in-process runner."""
    from steelworks.core.config import load
    from steelworks.platform import cli, pipeline
    from steelworks.platform.settings import PipelineConfig

    for var in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(var, raising=False)

    def no_ray(cfg: PipelineConfig) -> None:
        raise AssertionError("Ray was started for a one-replica eval")

    monkeypatch.setattr(cli, "_connect", no_ray)
    sets = [f"eval.benchmark={ceval_dir}", "eval.split=val", "eval.num_shots=1",
            "eval.chat=false", f"runs_dir={tmp_path / 'runs'}", "run=adhoc"]
    argv = ["eval", "--model", str(shaken_model_dir)] + [a for kv in sets for a in ("--set", kv)]
    assert cli.main(argv) == 0
    (report,) = (tmp_path / "runs" / "adhoc").glob("eval-*/report.json")
    got = json.loads(report.read_text("utf-8"))["predictions"]
    cfg = load(PipelineConfig, None, sets)
    _, expected = evaluate(*shaken, ceval_dir, cfg.eval)
    assert len(expected) == 5
    _same(got, expected)

    # Ray is used when it adds something: more replicas, or a cluster to place them on.
    assert not pipeline.eval_uses_ray(cfg)
    assert pipeline.eval_uses_ray(load(PipelineConfig, None, sets + ["eval.replicas=2"]))
    assert pipeline.eval_uses_ray(load(PipelineConfig, None, sets + ["ray.address=h:6379"]))
    monkeypatch.setenv("RAY_ADDRESS", "h:6379")
    assert pipeline.eval_uses_ray(cfg)


@pytest.mark.parametrize("field,value,message", [
    ("mode", "sampling", "eval.mode must be 'loglik' or 'generative'"),
    ("replicas", 0, "eval.replicas must be >= 1"),
    ("max_new_tokens", 0, "eval.max_new_tokens must be >= 1"),
    ("cpus_per_replica", 0, "eval.cpus_per_replica must be > 0"),
])
def test_eval_config_rejects_bad_values(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EvalConfig(**{field: value})
