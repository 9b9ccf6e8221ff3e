"""Config loading: YAML + --set overrides, strict keys and types, every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest

from steelworks.core.config import ConfigError, apply_overrides, load, to_dict
from steelworks.platform.settings import PipelineConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "steel-1b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from steelworks.core.config import from_dict, read_yaml

    cfg = load(PipelineConfig, path)
    assert isinstance(cfg, PipelineConfig)
    # Every key in the file took effect (nothing silently defaulted) ...
    raw, resolved = read_yaml(path), to_dict(cfg)
    for key, value in raw.items():
        if not isinstance(value, dict):
            assert resolved[key] == value, key
    # ... and the resolved config round-trips through plain dicts unchanged.
    assert from_dict(PipelineConfig, resolved) == cfg


def test_steel_1b_matches_published_shape():
    from steelworks.train.models import build_hf_config

    cfg = load(PipelineConfig, Path(__file__).resolve().parents[1] / "configs" / "steel-1b.yaml")
    hf = build_hf_config(cfg.pretrain.model, vocab_size=151936)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads) == (1792, 18, 32)
    # transformers 5 keeps rope_theta in rope_parameters
    assert hf.rope_parameters["rope_theta"] == 1e6 and hf.max_position_embeddings == 2048
    assert cfg.pack.seq_len == 2048
    o = cfg.pretrain.optim
    assert (o.lr, o.warmup_steps, o.schedule, o.betas, o.weight_decay, o.grad_clip) == \
        (3e-4, 1000, "cosine", [0.9, 0.95], 0.05, 1.0)


def test_overrides_parse_types():
    cfg = load(PipelineConfig, None, ["pretrain.optim.lr=3e-4", "pretrain.max_steps=7",
                                      "sft.use_gpu=true", "run=abc", "eval.max_items=null"])
    assert cfg.pretrain.optim.lr == 3e-4 and isinstance(cfg.pretrain.optim.lr, float)
    assert cfg.pretrain.max_steps == 7 and cfg.sft.use_gpu is True and cfg.run == "abc"
    assert cfg.eval.max_items is None


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as e:
        load(PipelineConfig, None, ["pretrain.optim.learning_rate=1"])
    msg = str(e.value)
    assert "pretrain.optim.learning_rate" in msg and "lr" in msg and "warmup_steps" in msg


def test_unknown_top_level_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run: x\ntrian: {max_steps: 3}\n")
    with pytest.raises(ConfigError) as e:
        load(PipelineConfig, p)
    assert str(p) in str(e.value) and "trian" in str(e.value) and "pretrain" in str(e.value)


@pytest.mark.parametrize("override,expect,names", [
    ("pretrain.max_steps=ten", "expected int", "pretrain.max_steps"),
    ("pretrain.max_steps=1.5", "expected int", "pretrain.max_steps"),
    ("sft.use_gpu=3", "expected bool", "sft.use_gpu"),
    ("pretrain.optim.schedule=linear", "valid choices: 'cosine', 'constant', 'wsd'",
     "pretrain.optim.schedule"),
    ("eval.scoring=vibes", "valid choices", "eval.scoring"),
    ("stages=[data, bake]", "unknown stage 'bake'", "valid stages"),
    ("pretrain.model=3", "expected a mapping", "pretrain.model"),
    ("pretrain.optim.betas=[0.9]", "two values", "pretrain.optim"),
])
def test_wrong_types_and_values_are_named(override, expect, names):
    with pytest.raises(ConfigError) as e:
        load(PipelineConfig, None, [override])
    assert expect in str(e.value) and names in str(e.value), str(e.value)


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["pretrain.max_steps"])
    p = tmp_path / "broken.yaml"
    p.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(PipelineConfig, p)
    with pytest.raises(ConfigError, match="not found"):
        load(PipelineConfig, tmp_path / "missing.yaml")


def test_to_dict_is_plain_and_reloadable():
    cfg = load(PipelineConfig, None, ["pretrain.max_steps=9"])
    d = to_dict(cfg)
    assert d["pretrain"]["max_steps"] == 9 and isinstance(d["data"]["demo"], dict)
    from steelworks.core.config import from_dict

    assert from_dict(PipelineConfig, d) == cfg


def test_cli_reports_config_errors(capsys):
    from steelworks.platform.cli import main

    assert main(["data", "--set", "data.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "data.bogus" in err and "min_chars" in err


def test_cli_restart_reaches_the_train_stages_only(monkeypatch):
    """`--restart` exists on the train stages and the pipeline commands, and reaches the
    runner; the data stages have no such flag (nothing of theirs is ever wiped by it)."""
    import pytest

    from steelworks.platform import cli, pipeline

    calls = []
    monkeypatch.setattr(cli, "_connect", lambda cfg: None)
    monkeypatch.setattr(pipeline, "summarize", lambda cfg, results: "")
    for name in ("pretrain", "sft"):
        monkeypatch.setitem(pipeline.RUNNERS, name,
                            lambda cfg, force=False, restart=False, name=name: calls.append((name, force, restart)) or {})
    assert cli.main(["pretrain", "--restart"]) == 0 and cli.main(["sft"]) == 0
    assert calls == [("pretrain", False, True), ("sft", False, False)]
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, force=False, restart=False: calls.append(restart) or {})
    assert cli.main(["pipeline", "--restart"]) == 0 and calls[-1] is True
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["data", "--restart"])


def test_readme_fine_tuning_config_is_the_shipped_one():
    """The README's copy-paste config for a local Qwen2 checkpoint is configs/finetune-qwen2.yaml
    verbatim (and so loads: test_every_shipped_config_loads)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    shipped = (root / "configs" / "finetune-qwen2.yaml").read_text()
    assert "## Fine-tuning an existing model" in readme
    assert f"```yaml\n{shipped.rstrip()}\n```" in readme
    cfg = load(PipelineConfig, root / "configs" / "finetune-qwen2.yaml")
    assert cfg.sft.init_from and cfg.sft.lora is not None and "pretrain" not in cfg.stages
