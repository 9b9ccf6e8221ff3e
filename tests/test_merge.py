"""Model merging (steelworks/train/merge.py, `steelworks merge`): the three methods against the
same arithmetic done by hand, SLERP's endpoints and a known angle, the merged directory in
transformers and in our from_hf, refusals that name the directory/field/file, and the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from steelworks.platform import cli
from steelworks.train import merge
from steelworks.train.hf_io import from_hf

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=48)


def _save(out: Path, seed: int, tok_dir: Path, arch: str = "qwen2", **overrides) -> Path:
    """A tiny randomly initialised HF checkpoint (weights seeded by ``seed``) with tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from steelworks.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=len(tok), **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def model_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("merge_models")
    return [_save(root / f"m{seed}", seed, tiny_tokenizer_dir) for seed in range(3)]


def test_linear_matches_direct_average(models, tmp_path):
    out = merge.merge_dirs("linear", models, tmp_path / "out", weights=[1.0, 2.0, 1.0])
    got, sds = _weights(out), [_weights(m) for m in models]
    assert set(got) == set(sds[0])
    for name, t in got.items():
        want = 0.25 * sds[0][name] + 0.5 * sds[1][name] + 0.25 * sds[2][name]
        assert t.dtype == sds[0][name].dtype
        torch.testing.assert_close(t, want, atol=1e-6, rtol=0)
    # The in-memory API gives the same tensors, and weights are relative (normalised).
    same = merge.linear(sds, [0.25, 0.5, 0.25])
    assert all(torch.equal(same[n], got[n]) for n in got)
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "linear" and record["weights"] == [1.0, 2.0, 1.0]
    assert record["applied_weights"] == [0.25, 0.5, 0.25] and record["t"] is None
    assert record["models"] == [str(m.resolve()) for m in models]
    # Config and tokenizer come from the first model, byte for byte.
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (models[0] / name).read_bytes()


def test_task_arithmetic_matches_direct_sum(models, tmp_path):
    base, ft = models[0], models[1:]
    out = merge.merge_dirs("task_arithmetic", ft, tmp_path / "out", base=base,
                           weights=[0.7, -0.3])
    got, b, m1, m2 = _weights(out), _weights(base), _weights(ft[0]), _weights(ft[1])
    for name, t in got.items():
        want = b[name] + 0.7 * (m1[name] - b[name]) - 0.3 * (m2[name] - b[name])
        torch.testing.assert_close(t, want, atol=1e-6, rtol=0)
    same = merge.task_arithmetic(b, [m1, m2], [0.7, -0.3])
    assert all(torch.equal(same[n], got[n]) for n in got)
    # Weight 1 on a single model is that model (a delta added in full, not normalised).
    one = merge.task_arithmetic(b, [m1])
    for name in got:
        torch.testing.assert_close(one[name], m1[name], atol=1e-6, rtol=0)
    assert json.loads((out / "merge.json").read_text())["base"] == str(base.resolve())


def test_slerp_endpoints_are_exact(models, tmp_path):
    a, b = _weights(models[0]), _weights(models[1])
    at0, at1 = merge.slerp(a, b, 0.0), merge.slerp(a, b, 1.0)
    assert all(torch.equal(at0[n], a[n]) and torch.equal(at1[n], b[n]) for n in a)
    out = merge.merge_dirs("slerp", models[:2], tmp_path / "out", t=1.0)
    assert all(torch.equal(t, b[n]) for n, t in _weights(out).items())
    mid = _weights(merge.merge_dirs("slerp", models[:2], tmp_path / "mid", t=0.5))
    # Two random tensors are far from colinear: the arc's midpoint is not the chord's.
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(mid[name], 0.5 * (a[name] + b[name]), atol=1e-4)


def test_slerp_known_values():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    h = math.sqrt(0.5)
    torch.testing.assert_close(merge.slerp_tensor(a, b, 0.5), torch.tensor([h, h]))
    c, s = math.cos(math.pi / 8), math.sin(math.pi / 8)
    torch.testing.assert_close(merge.slerp_tensor(a, b, 0.25), torch.tensor([c, s]))
    # Unnormalised tensors: the coefficients scale the originals (norm 2 stays 2 here).
    torch.testing.assert_close(merge.slerp_tensor(2 * a, 2 * b, 0.5), torch.tensor([2 * h, 2 * h]))
    # Orthogonal as flattened matrices, shape kept.
    m = merge.slerp_tensor(a.reshape(1, 2, 1), b.reshape(1, 2, 1), 0.5)
    assert m.shape == (1, 2, 1)
    # Colinear (and antiparallel, and zero) tensors fall back to linear interpolation.
    x = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(merge.slerp_tensor(x, 2 * x, 0.5), 1.5 * x)
    torch.testing.assert_close(merge.slerp_tensor(x, -x, 0.25), 0.5 * x)
    torch.testing.assert_close(merge.slerp_tensor(torch.zeros(3), x, 0.5), 0.5 * x)
    # bf16 in, bf16 out (computed in fp32).
    bf = merge.slerp_tensor(a.bfloat16(), b.bfloat16(), 0.5)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), torch.tensor([h, h]), atol=1e-2, rtol=0)


def test_merged_dir_loads_in_transformers_and_from_hf(models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = merge.merge_dirs("linear", models[:2], tmp_path / "out")
    got = _weights(out)
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    hf_sd = hf.state_dict()
    assert all(torch.equal(hf_sd[n], t) for n, t in got.items())
    ours = from_hf(out).eval()
    ours_sd = ours.state_dict()
    assert all(torch.equal(ours_sd[n], t) for n, t in got.items())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():  # our decoder returns the logits tensor itself
        torch.testing.assert_close(ours(ids), hf.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_stay_tied(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    tied = [_save(tmp_path / f"t{s}", s, tiny_tokenizer_dir, tie_word_embeddings=True)
            for s in range(2)]
    assert "lm_head.weight" not in _weights(tied[0])
    out = merge.merge_dirs("slerp", tied, tmp_path / "out", t=0.3)
    got = _weights(out)
    assert "lm_head.weight" not in got
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(hf.lm_head.weight, got["model.embed_tokens.weight"])
    assert torch.equal(from_hf(out).lm_head.weight, got["model.embed_tokens.weight"])


def test_mismatched_architecture_names_dir_and_field(models, tmp_path, tiny_tokenizer_dir):
    wide = _save(tmp_path / "wide", 0, tiny_tokenizer_dir, intermediate_size=64)
    with pytest.raises(ValueError, match=r"wide: config field intermediate_size is 64"):
        merge.merge_dirs("linear", [models[0], wide], tmp_path / "out")
    llama = _save(tmp_path / "llama", 0, tiny_tokenizer_dir, arch="llama", attention_bias=True)
    with pytest.raises(ValueError, match=r"llama: config field model_type is 'llama'"):
        merge.merge_dirs("linear", [models[0], llama], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_tensors_name_dir_and_tensor(models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(models[1], bad)
    sd = _weights(bad)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(31)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"bad: tensor model.layers.0.self_attn.q_proj.bias has "
                                         r"shape \[31\]"):
        merge.merge_dirs("linear", [models[0], bad], tmp_path / "out")
    del sd["model.norm.weight"]
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"bad: tensors differ .* missing \['model.norm.weight'\]"):
        merge.merge_dirs("task_arithmetic", [bad], tmp_path / "out", base=models[0])
    with pytest.raises(ValueError, match="different tensors"):
        merge.linear([_weights(models[0]), sd])


def test_missing_files_are_named(models, tmp_path):
    no_config = tmp_path / "no_config"
    shutil.copytree(models[1], no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(no_config / "config.json")):
        merge.merge_dirs("linear", [models[0], no_config], tmp_path / "out")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(models[1], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=str(no_weights / "model.safetensors")):
        merge.merge_dirs("linear", [models[0], no_weights], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere: no such model directory"):
        merge.merge_dirs("linear", [models[0], tmp_path / "nowhere"], tmp_path / "out")


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="slerp", n=3, t=0.5), "exactly 2 models"),
    (dict(method="slerp", n=2), r"t in \[0, 1\]"),
    (dict(method="slerp", n=2, t=1.5), r"t in \[0, 1\]"),
    (dict(method="slerp", n=2, t=0.5, weights=[1.0, 1.0]), "not weights"),
    (dict(method="linear", n=2, t=0.5), "not t"),
    (dict(method="linear", n=1), "at least 2"),
    (dict(method="linear", n=2, weights=[1.0]), "1 weights for 2 models"),
    (dict(method="linear", n=2, weights=[1.0, -1.0]), "sum must be positive"),
    (dict(method="linear", n=2, weights=[1.0, math.nan]), "finite"),
    (dict(method="linear", n=2, base=True), "takes no base"),
    (dict(method="task_arithmetic", n=2), "needs a base"),
    (dict(method="ties", n=2), "unknown merge method 'ties'"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        merge.check_weights(kwargs["method"], kwargs["n"], kwargs.get("weights"),
                            kwargs.get("t"), kwargs.get("base", False))


def test_output_is_atomic_and_never_overwrites_other_dirs(models, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is one of the inputs"):
        merge.merge_dirs("linear", models[:2], models[1])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an earlier merge output"):
        merge.merge_dirs("linear", models[:2], other)
    assert (other / "notes.txt").read_text() == "keep me"
    # An earlier merge output is replaced.
    out = merge.merge_dirs("slerp", models[:2], tmp_path / "out", t=0.0)
    merge.merge_dirs("slerp", models[:2], out, t=1.0)
    assert json.loads((out / "merge.json").read_text())["t"] == 1.0
    # A crash while writing leaves the previous output and no temporary directory.
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        merge.merge_dirs("linear", models[:2], out)
    with pytest.raises(OSError, match="disk full"):
        merge.merge_dirs("linear", models[:2], tmp_path / "fresh")
    assert json.loads((out / "merge.json").read_text())["t"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


def test_cli_merge(models, tmp_path, capsys):
    out = tmp_path / "cli_out"
    argv = ["merge", "--method", "task_arithmetic", "--base", str(models[0]),
            "--models", str(models[1]), str(models[2]), "--weights", "0.5", "-0.25",
            "--out", str(out)]
    assert cli.main(argv) == 0
    assert "merged 2 model(s) with task_arithmetic" in capsys.readouterr().out
    want = merge.task_arithmetic(_weights(models[0]), [_weights(m) for m in models[1:]],
                                 [0.5, -0.25])
    assert all(torch.equal(t, want[n]) for n, t in _weights(out).items())
    assert json.loads((out / "merge.json").read_text())["weights"] == [0.5, -0.25]
    # Bad input: exit 2 with a one-line message naming the problem.
    assert cli.main(["merge", "--method", "slerp", "--models", str(models[0]), str(models[1]),
                     "--out", str(tmp_path / "x")]) == 2
    assert "steelworks merge: slerp needs t" in capsys.readouterr().err
    assert cli.main(["merge", "--method", "linear", "--models", str(models[0]),
                     str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere: no such model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["merge", "--method", "ties", "--models", str(models[0]), "--out", "x"])
    assert e.value.code == 2
    assert cli.MERGE_METHODS == merge.METHODS


def test_bf16_and_sharded_inputs(tmp_path, tiny_tokenizer_dir):
    """bf16 checkpoints merge to bf16, computed in fp32 (not rounded to bf16 at each step);
    a sharded checkpoint (index + several files) reads like a single file."""
    from transformers import AutoModelForCausalLM

    dirs = []
    for seed in range(2):
        d = _save(tmp_path / f"s{seed}", seed, tiny_tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
        (d / "model.safetensors").unlink()  # the tokenizer files stay
        model.save_pretrained(d, max_shard_size="20KB")
        dirs.append(d)
    assert (dirs[0] / "model.safetensors.index.json").exists()
    out = merge.merge_dirs("linear", dirs, tmp_path / "out", weights=[0.3, 0.7])
    sds = [model_state(d) for d in dirs]
    got = _weights(out)
    assert set(got) == set(sds[0])
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        # The fp32 result, rounded once to bf16: within one bf16 step (2**-8 relative) of it.
        want = 0.3 * sds[0][name].float() + 0.7 * sds[1][name].float()
        assert ((t.float() - want).abs() <= want.abs() * 2**-8 + 1e-7).all(), name
    assert AutoModelForCausalLM.from_pretrained(str(out)).dtype == torch.bfloat16
