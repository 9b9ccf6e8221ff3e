"""Stage caching on content (steelworks.core.rundir): what re-runs a stage and what does not.

A stage's fingerprint covers its config, the content of the small files it reads (recipes,
flagged-word lists, a pretrained tokenizer, benchmark CSVs), the path + size + mtime of its
raw inputs, the package version, and the *content* of its input stages' outputs; never a
manifest's timestamps. The unit tests drive ``Stage`` on temporary directories; the last
test runs the data and tokenizer stages on a tiny ``data.source: files`` corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from steelworks.core.atomic import sha256_file
from steelworks.core.rundir import MANIFEST, Stage, content_key


def _open(tmp_path: Path, name: str, config: dict | None = None, inputs: tuple[str, ...] = (),
          reads: tuple[Path, ...] = (), raw_inputs: tuple[Path, ...] = ()) -> Stage:
    return Stage.open(tmp_path / "runs", "r", name, config or {}, list(inputs),
                      reads=list(reads), raw_inputs=list(raw_inputs))


def _finish(stage: Stage, files: dict[str, str], **kw) -> dict:
    for rel, text in files.items():
        stage.path(rel).write_text(text)
    return stage.finish(list(files), **kw)


# ----------------------------------------------------------------------------- reads


def test_editing_a_read_file_changes_the_fingerprint(tmp_path, caplog):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("process: [nfkc]\n")
    s = _open(tmp_path, "data", reads=(recipe,))
    _finish(s, {"out.txt": "x"})
    assert _open(tmp_path, "data", reads=(recipe,)).is_current()
    # Rewritten with the same bytes: a content key, not a timestamp, so still current.
    st = recipe.stat()
    recipe.write_text("process: [nfkc]\n")
    os.utime(recipe, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _open(tmp_path, "data", reads=(recipe,)).is_current()
    recipe.write_text("process: [nfkc, remove_control_chars]\n")
    again = _open(tmp_path, "data", reads=(recipe,))
    with caplog.at_level("INFO", logger="steelworks.core.rundir"):
        assert again.fingerprint != s.fingerprint and not again.is_current()
    assert f"data: {recipe} (read) changed" in caplog.text  # the log says why it re-runs


def test_a_read_directory_is_keyed_on_every_file_below_it(tmp_path):
    bench = tmp_path / "bench"
    (bench / "val").mkdir(parents=True)
    (bench / "val" / "law.csv").write_text("id,question\n1,q\n")
    before = content_key([bench])
    (bench / "val" / "law.csv").write_text("id,question\n1,q2\n")
    edited = content_key([bench])
    (bench / "val" / "law.csv").rename(bench / "val" / "art.csv")
    renamed = content_key([bench])
    assert len({before, edited, renamed}) == 3
    # Where the directory is does not matter (a Ray job runs from an unpacked copy of the
    # repository): only names below it and contents.
    (tmp_path / "elsewhere").mkdir()
    bench.rename(tmp_path / "elsewhere" / "bench")
    assert content_key([tmp_path / "elsewhere" / "bench"]) == renamed


def test_a_missing_read_is_a_clear_error(tmp_path):
    s = _open(tmp_path, "tokenizer", reads=(tmp_path / "no_such_tokenizer",))
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        s.fingerprint  # noqa: B018


def test_touching_a_raw_input_changes_the_fingerprint(tmp_path, caplog):
    corpus = tmp_path / "web.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    s = _open(tmp_path, "data", raw_inputs=(corpus,))
    _finish(s, {"out.txt": "x"})
    assert _open(tmp_path, "data", raw_inputs=(corpus,)).is_current()
    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # `touch`: same bytes
    with caplog.at_level("INFO", logger="steelworks.core.rundir"):
        assert not _open(tmp_path, "data", raw_inputs=(corpus,)).is_current()
    assert "raw input files (size or mtime) changed" in caplog.text


def test_the_key_is_taken_before_the_work(tmp_path):
    """A file edited while the stage runs: the manifest keeps the key the work started from,
    so the next run sees the edit and re-runs."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("v1\n")
    s = _open(tmp_path, "data", reads=(recipe,))
    assert not s.is_current()  # the pipeline's check, before the work, takes the key
    recipe.write_text("v2\n")  # edited during the run
    _finish(s, {"out.txt": "x"})
    assert not _open(tmp_path, "data", reads=(recipe,)).is_current()


# ----------------------------------------------------------------------------- input stages


def test_refinished_input_with_identical_outputs_keeps_downstream_current(tmp_path):
    a = _open(tmp_path, "data", {"x": 1})
    _finish(a, {"clean/part-0.parquet": "rows"}, metrics={"seconds": 1.0})
    b = _open(tmp_path, "tokenizer", {"y": 1}, inputs=("data",))
    _finish(b, {"tok.json": "t"})
    # `--force` on the data stage: same bytes out, new timestamps, timings and metrics.
    a2 = _open(tmp_path, "data", {"x": 1})
    a2.started_at -= 3600
    m2 = _finish(a2, {"clean/part-0.parquet": "rows"}, metrics={"seconds": 2.5})
    assert m2["started_at"] != json.loads((b.dir / MANIFEST).read_text())["ended_at"]
    again = _open(tmp_path, "tokenizer", {"y": 1}, inputs=("data",))
    assert again.fingerprint == b.fingerprint and again.is_current()


def test_a_changed_input_output_changes_downstream(tmp_path):
    a = _open(tmp_path, "data", {"x": 1})
    _finish(a, {"clean/part-0.parquet": "rows"})
    b = _open(tmp_path, "tokenizer", {"y": 1}, inputs=("data",))
    _finish(b, {"tok.json": "t"})
    _finish(_open(tmp_path, "data", {"x": 1}), {"clean/part-0.parquet": "other rows"})
    again = _open(tmp_path, "tokenizer", {"y": 1}, inputs=("data",))
    assert again.fingerprint != b.fingerprint and not again.is_current()


def test_extra_fields_handed_downstream_are_content(tmp_path):
    """The tokenizer reads the data manifest's ``ratios``: a change there must re-run it."""
    a = _open(tmp_path, "data")
    _finish(a, {"clean/p.parquet": "rows"}, extra={"ratios": {"web": 0.5, "code": 0.5}})
    b = _open(tmp_path, "tokenizer", inputs=("data",))
    _finish(b, {"tok.json": "t"})
    _finish(_open(tmp_path, "data"), {"clean/p.parquet": "rows"},
            extra={"ratios": {"web": 0.8, "code": 0.2}})
    assert not _open(tmp_path, "tokenizer", inputs=("data",)).is_current()


def test_reports_are_outputs_but_not_content(tmp_path):
    """Histograms and logs are checked like every output but are not what downstream reads."""
    a = _open(tmp_path, "data")
    m = _finish(a, {"clean/p.parquet": "rows", "plots/len.png": "png1"}, reports=["plots/len.png"])
    assert set(m["outputs"]) == {"clean/p.parquet", "plots/len.png"}
    b = _open(tmp_path, "tokenizer", inputs=("data",))
    _finish(b, {"tok.json": "t"})
    _finish(_open(tmp_path, "data"), {"clean/p.parquet": "rows", "plots/len.png": "png two"},
            reports=["plots/len.png"])
    assert _open(tmp_path, "tokenizer", inputs=("data",)).is_current()
    with pytest.raises(ValueError, match="not.txt"):
        _open(tmp_path, "data").finish(["clean/p.parquet"], reports=["not.txt"])


def test_manifest_records_what_was_read(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("process: [nfkc]\n")
    corpus = tmp_path / "web.jsonl"
    corpus.write_text("0123456789")
    a = _open(tmp_path, "data")
    _finish(a, {"clean/p.parquet": "rows"})
    m = _finish(_open(tmp_path, "tokenizer", inputs=("data",), reads=(recipe,),
                      raw_inputs=(corpus,)), {"tok.json": "t"})
    assert m["reads"] == {str(recipe): sha256_file(recipe)}
    assert m["raw_inputs"]["files"] == 1 and m["raw_inputs"]["bytes"] == 10
    data = json.loads((a.dir / MANIFEST).read_text())
    assert m["inputs"]["data"]["content_sha256"] == data["content_sha256"]


# ----------------------------------------------------------------------------- what stages read


def test_data_stage_reads_recipes_word_lists_and_raw_files(tmp_path):
    from steelworks.data.clean import files_read
    from steelworks.data.config import DataConfig, SourceConfig
    from steelworks.data.recipe import RECIPES_DIR

    (tmp_path / "lists").mkdir()
    words = tmp_path / "lists" / "bad.txt"
    words.write_text("spam\n")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("process:\n  - flagged_words_ratio: {words: lists/bad.txt, max: 0.1}\n")
    (tmp_path / "web").mkdir()
    for i in range(2):
        (tmp_path / "web" / f"p{i}.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "sft.jsonl").write_text("{}\n")
    cfg = DataConfig(source="files", recipe=str(recipe), sources=[
        SourceConfig(name="web", path=str(tmp_path / "web")),
        SourceConfig(name="code", path=str(tmp_path / "web" / "p0.jsonl"), recipe="steel_code")],
        sft_sources=[SourceConfig(name="chat", path=str(tmp_path / "sft.jsonl"), format="openai")])
    reads, raw = files_read(cfg)
    # The recipe, the word list it names (relative to the recipe's folder), the shipped
    # recipe found by name.
    assert [Path(p) for p in reads] == [recipe, words, RECIPES_DIR / "steel_code.yaml"]
    assert [Path(p).name for p in raw] == ["p0.jsonl", "p1.jsonl", "p0.jsonl", "sft.jsonl"]
    demo, demo_raw = files_read(DataConfig(recipe="steel_text"))
    assert [Path(p) for p in demo] == [RECIPES_DIR / "steel_text.yaml"] and demo_raw == []


def test_tokenizer_stage_reads_the_tokenizer_files_not_weights(tmp_path):
    from steelworks.platform.pipeline import tokenizer_files

    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (tok / name).write_text(name)
    # A model directory used as a tokenizer: its weights are not the tokenizer's.
    assert [p.name for p in tokenizer_files(str(tok))] == ["tokenizer.json", "tokenizer_config.json"]


# ----------------------------------------------------------------------------- end to end


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    towns = ["北京", "上海", "广州", "成都", "杭州", "西安"]
    docs = [f"第{i}篇。{towns[i % 6]}" + "是一座城市，人们喜欢散步。" * (1 + i % 4) for i in range(40)]
    path = root / "web.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
                    encoding="utf-8")
    return path


RECIPE = "name: tiny\nprocess:\n  - nfkc: {}\n  - text_length: {min: 5, max: 100000}\n"


def _mtime(stage_dir: Path) -> int:
    return (stage_dir / MANIFEST).stat().st_mtime_ns


@pytest.mark.ray
def test_pipeline_reruns_on_recipe_edit_and_not_on_identical_force(tmp_path, ray_local):
    from steelworks.data.config import (
        DataConfig,
        DedupConfig,
        PackConfig,
        SourceConfig,
        TokenizerConfig,
    )
    from steelworks.platform.pipeline import run_data, run_tokenizer
    from steelworks.platform.settings import PipelineConfig

    corpus = _corpus(tmp_path / "corpus")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    cfg = PipelineConfig(
        run="cache", runs_dir=str(tmp_path / "runs"), stages=["data", "tokenizer"],
        data=DataConfig(source="files", recipe=str(recipe), num_shards=1,
                        sources=[SourceConfig(name="web", path=str(corpus))],
                        dedup=DedupConfig(exact=False)),  # no shuffle: seconds, not a minute
        tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1),
        pack=PackConfig(seq_len=16, sequences_per_shard=64))
    root = tmp_path / "runs" / "cache"
    data, tok = run_data(cfg), run_tokenizer(cfg)
    t_data, t_tok = _mtime(root / "data"), _mtime(root / "tokenizer")

    # --force re-runs the data stage; its outputs come out byte-identical, so the tokenizer
    # stays up to date.
    forced = run_data(cfg, force=True)
    assert _mtime(root / "data") != t_data, "--force did not re-run the data stage"
    assert forced["outputs"] == data["outputs"], "the data stage's outputs are not reproducible"
    assert run_tokenizer(cfg)["outputs"] == tok["outputs"]
    assert _mtime(root / "tokenizer") == t_tok, "tokenizer re-ran after a byte-identical data run"
    t_data = _mtime(root / "data")

    # Editing the recipe (only the file: the config names the same path) re-runs data, whose
    # cleaned text changes, and so the tokenizer.
    recipe.write_text(RECIPE.replace("min: 5", "min: 40"))
    edited = run_data(cfg)
    assert _mtime(root / "data") != t_data, "editing the recipe did not re-run the data stage"
    assert edited["metrics"]["counts"]["web"].get("filtered:text_length", 0) > 0
    run_tokenizer(cfg)
    assert _mtime(root / "tokenizer") != t_tok, "the tokenizer did not re-run on new data"
    # And now both are current.
    t_data, t_tok = _mtime(root / "data"), _mtime(root / "tokenizer")
    run_data(cfg), run_tokenizer(cfg)
    assert (_mtime(root / "data"), _mtime(root / "tokenizer")) == (t_data, t_tok)


def test_mix_settings_key_the_tokenizer_stage_not_the_data_stage(tmp_path):
    """Ratios and mix policy are the packer's: changing them must re-pack, and must not
    re-clean a corpus (hours at scale)."""
    from steelworks.core.config import load
    from steelworks.platform.pipeline import data_stage_config, mix_ratios
    from steelworks.platform.settings import PipelineConfig

    def cfg(*overrides: str) -> PipelineConfig:
        return load(PipelineConfig, None, [
            "data.source=files", f"runs_dir={tmp_path}",
            "data.sources=[{name: a, path: a.jsonl, ratio: 0.5}, {name: b, path: b.jsonl, ratio: 0.5}]",
            *overrides])

    base = cfg()
    for changed in (cfg("data.mix.policy=upsample"), cfg("data.mix.max_epochs=2"),
                    cfg("data.sources=[{name: a, path: a.jsonl, ratio: 0.7}, "
                        "{name: b, path: b.jsonl, ratio: 0.3}]")):
        assert data_stage_config(changed) == data_stage_config(base)
    assert mix_ratios(cfg("data.sources=[{name: a, path: a.jsonl, ratio: 0.7}, "
                          "{name: b, path: b.jsonl, ratio: 0.3}]")) == {"a": 0.7, "b": 0.3}
    assert data_stage_config(cfg("data.min_chars=9")) != data_stage_config(base)
    assert mix_ratios(load(PipelineConfig, None, [])) == {"demo": None}
