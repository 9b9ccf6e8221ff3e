"""Parity of our log-likelihood letter scoring with lm-eval 0.4.13's HF backend.

Both sides score the same in-memory model (the shaken tiny Qwen2) on the same CSV files:
ours through ``runner.evaluate`` (chat=False, letter mode), lm-eval through
``lmeval_tasks.lmeval_predictions`` (generated per-subject tasks, ``HFLM``,
``simple_evaluate``; the settings are in that module's docstring).  Each item must get the
same predicted letter, the same four log-likelihoods (to float noise: the two batch and pad
differently) and the very same prompt text: the tiny model's 512-token window truncates
long prompts from the left, so equal scores alone would not prove equal prompt headers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import cmmlu_dir
from test_evals import DEV, HEADER, MAPPING, VAL, _write_csv

from steelworks.data.benchmarks import LETTERS
from steelworks.data.exam_prompt import HEADER as PROMPT_HEADER
from steelworks.data.exam_prompt import build_prompt
from steelworks.evals.config import EvalConfig
from steelworks.evals.lmeval_tasks import lmeval_predictions, write_lmeval_tasks
from steelworks.evals.runner import evaluate, load_items
from steelworks.evals.scoring import build_requests

pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency: pip install -e '.[dev]'")

TOLERANCE = 1e-4  # absolute, on summed log-probabilities (float32, different batch padding)
CMMLU_DEV_ITEMS = 67 * 5


@pytest.fixture(scope="module")
def shaken(shaken_model_dir: Path) -> tuple[Any, Any]:
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.models import load_model

    return load_model(shaken_model_dir).eval(), load_tokenizer(shaken_model_dir)


def _compare(shaken: tuple[Any, Any], bench: Path, cfg: EvalConfig, cache: Path,
             expected_items: int) -> None:
    model, tok = shaken
    _, ours = evaluate(model, tok, bench, cfg)
    theirs = lmeval_predictions(model, tok, bench, split=cfg.split, num_shots=cfg.num_shots,
                                batch_size=cfg.batch_size, cache_dir=cache)
    keys = [(r["subject"], r["id"]) for r in ours]
    assert len(ours) == expected_items and len(set(keys)) == expected_items  # no vacuous pass
    assert set(theirs) == set(keys)

    subjects, items, shots = load_items(bench, cfg)
    contexts, _ = build_requests(tok, items, subjects, cfg, shots)
    assert [(it.subject, it.id) for it in items] == keys
    wrong_prompt = [k for k, ctx in zip(keys, contexts, strict=True) if theirs[k]["context"] != ctx]
    assert not wrong_prompt, f"lm-eval's prompt differs from ours for {wrong_prompt[:5]}"

    disagree = [(k, r["pred"], theirs[k]["pred"], r["scores"], theirs[k]["scores"])
                for k, r in zip(keys, ours, strict=True) if theirs[k]["pred"] != r["pred"]]
    assert not disagree, f"{len(disagree)}/{len(ours)} predictions differ, e.g. {disagree[:3]}"
    worst = max(abs(r["scores"][x] - theirs[k]["scores"][x])
                for k, r in zip(keys, ours, strict=True) for x in LETTERS)
    assert worst < TOLERANCE, f"log-likelihoods differ by up to {worst}"


def test_letter_continuation_tokenizes_the_same_joined_or_apart(shaken, shared_dir: Path) -> None:
    """HFLM encodes context + letter and splits at the context's length; we encode the two
    apart.  Equal only if the letter never merges with the "：" before it."""
    _, tok = shaken
    bench = cmmlu_dir(shared_dir)
    cfg = EvalConfig(benchmark=str(bench), split="dev", chat=False, scoring="letter")
    subjects, items, shots = load_items(bench, cfg)
    contexts, _ = build_requests(tok, items, subjects, cfg, shots)
    for context in contexts:
        ctx = tok.encode(context, add_special_tokens=False)
        for letter in LETTERS:
            whole = tok.encode(context + letter, add_special_tokens=False)
            assert whole[: len(ctx)] == ctx
            assert whole[len(ctx) :] == tok.encode(letter, add_special_tokens=False)


def test_cmmlu_dev_zero_shot_matches_lm_eval(shaken, shared_dir: Path, offline,
                                             datasets_cache: Path) -> None:
    bench = cmmlu_dir(shared_dir)
    cfg = EvalConfig(benchmark=str(bench), split="dev", chat=False, scoring="letter", num_shots=0)
    _compare(shaken, bench, cfg, datasets_cache, CMMLU_DEV_ITEMS)


def test_cmmlu_dev_few_shot_matches_lm_eval(shaken, shared_dir: Path, offline,
                                            datasets_cache: Path) -> None:
    """4-shot, the most the 5-item dev split allows: each item's shots are the other four,
    in file order (ours: ``select_shots`` skips the item; lm-eval: ``first_n`` drops the doc
    itself when the few-shot split is the evaluated split).  Most of these prompts exceed the
    tiny model's 512 tokens and both sides cut them from the left, so it is the prompt-text
    comparison that proves the shots are the same."""
    bench = cmmlu_dir(shared_dir)
    cfg = EvalConfig(benchmark=str(bench), split="dev", chat=False, scoring="letter", num_shots=4)
    _compare(shaken, bench, cfg, datasets_cache, CMMLU_DEV_ITEMS)


@pytest.fixture
def official_ceval_dir(tmp_path: Path) -> Path:
    """test_evals' C-Eval items in the official zip's layout: a folder per split, val without
    the explanation column and test without the answer too (one has a two-line question)."""
    root = tmp_path / "ceval"
    for split in ("dev", "val", "test"):
        (root / split).mkdir(parents=True)
    (root / "subject_mapping.json").write_text(json.dumps(MAPPING, ensure_ascii=False), "utf-8")
    for subject, rows in VAL.items():
        _write_csv(root / "val" / f"{subject}_val.csv", [r[:7] for r in rows], HEADER[:7])
        _write_csv(root / "test" / f"{subject}_test.csv", [r[:6] for r in rows], HEADER[:6])
    for subject, rows in DEV.items():
        _write_csv(root / "dev" / f"{subject}_dev.csv", rows)
    return root


@pytest.mark.parametrize(("split", "shots"), [("val", 2), ("test", 0)])
def test_ceval_layout_matches_lm_eval(shaken, official_ceval_dir: Path, split: str, shots: int,
                                      offline, datasets_cache: Path) -> None:
    """The C-Eval layout: shots from another split than the evaluated one, splits whose
    columns differ, and the unanswered test split."""
    cfg = EvalConfig(benchmark=str(official_ceval_dir), split=split, chat=False,
                     scoring="letter", num_shots=shots)
    _compare(shaken, official_ceval_dir, cfg, datasets_cache, 5)


def test_write_lmeval_tasks_names_and_refusals(official_ceval_dir: Path, tmp_path: Path) -> None:
    names = write_lmeval_tasks(official_ceval_dir, tmp_path / "tasks", "val", num_shots=2)
    assert names == ["steelworks_ceval_college_physics", "steelworks_ceval_modern_chinese_history"]
    assert sorted(p.stem for p in (tmp_path / "tasks").glob("*.yaml")) == names
    with pytest.raises(ValueError, match="num_shots=0"):  # test has no answers, dev does
        write_lmeval_tasks(official_ceval_dir, tmp_path / "t2", "test", num_shots=1)


# CMMLU rows whose cells carry the stray whitespace real CSVs have (24 options of the dev split
# end in a space): leading and trailing spaces, a tab, an ideographic space, a space-padded
# question (lm-eval strips the question, never an option) and one option that is spaces inside.
SPACED_HEADER = ["", "Question", *LETTERS, "Answer"]
SPACED_ROWS = {
    "agronomy": [
        ["0", " 下列作物中属于C4植物的是 ", " 小麦", "玉米 ", " 水稻 ", "大豆\t", "B"],
        ["1", "土壤pH值为5时呈", "酸性 ", "\u3000中性", "碱性", " 强 碱 性 ", "A"],
        ["2", "\n氮肥的主要作用是？", "促进 茎叶生长", " 促进开花", "促进结果  ", "  抗倒伏", "A"],
    ],
    "anatomy": [
        ["0", "人体最大的器官是", " 皮肤 ", "肝脏", " 肺", "心脏 ", "A"],
        ["1", "成人有多少块骨头？ ", "106", " 206", "306 ", " 406 ", "B"],
        ["2", "红细胞的主要功能是", "运输氧气 ", " 凝血", "免疫", "\t储能", "A"],
    ],
}


@pytest.fixture
def spaced_cmmlu_dir(tmp_path: Path) -> Path:
    """A two-subject CMMLU-layout directory (dev split) made of ``SPACED_ROWS``."""
    for subject, rows in SPACED_ROWS.items():
        path = tmp_path / "cmmlu" / "dev" / f"{subject}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([SPACED_HEADER, *rows])
    return tmp_path / "cmmlu"


def _builtin_cmmlu_template() -> dict[str, Any]:
    """lm-eval's own cmmlu task template (``lm_eval/tasks/cmmlu/_default_template_yaml``), as
    installed: plain YAML, no ``!function`` tags."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "cmmlu" / "_default_template_yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_prompt_keeps_option_spaces_like_lm_eval_cmmlu_template(spaced_cmmlu_dir: Path,
                                                                tmp_path: Path) -> None:
    """Options are scored as the CSV has them, spaces included, and our zero-shot prompt is
    the header followed by exactly what lm-eval's built-in cmmlu ``doc_to_text`` renders for
    the same row (rendered here by lm-eval's own template function)."""
    from lm_eval.utils import apply_template

    builtin = _builtin_cmmlu_template()
    cfg = EvalConfig(benchmark=str(spaced_cmmlu_dir), split="dev", chat=False, scoring="letter")
    subjects, items, _ = load_items(spaced_cmmlu_dir, cfg)
    by_key = {(it.subject, it.id): it for it in items}
    name_zh = {s.name: s.name_zh for s in subjects}
    assert len(items) == sum(len(rows) for rows in SPACED_ROWS.values())
    for subject, rows in SPACED_ROWS.items():
        for row in rows:
            doc = dict(zip(SPACED_HEADER, row, strict=True))
            item = by_key[(subject, row[0])]
            assert item.options == {x: doc[x] for x in LETTERS}  # untouched, spaces and all
            theirs = PROMPT_HEADER.format(subject=name_zh[subject]) + apply_template(
                builtin["doc_to_text"], doc)
            ours = build_prompt(name_zh[subject], item)
            assert ours == theirs, f"{subject}/{row[0]}: {ours!r} != {theirs!r}"

    # The task we write for lm-eval renders options with upstream's very template.
    write_lmeval_tasks(spaced_cmmlu_dir, tmp_path / "tasks", "dev")
    task = (tmp_path / "tasks" / "steelworks_cmmlu_agronomy.yaml").read_text(encoding="utf-8")
    line = next(x for x in task.splitlines() if x.startswith("doc_to_text: "))
    assert json.loads(line.removeprefix("doc_to_text: ")) == builtin["doc_to_text"]


@pytest.mark.parametrize("shots", [0, 2])
def test_spaced_options_match_lm_eval(shaken, spaced_cmmlu_dir: Path, shots: int, offline,
                                      datasets_cache: Path) -> None:
    """End to end on the spaced options: same prompts (shots included), same letters, same
    log-likelihoods as lm-eval running the task we write for these CSVs."""
    cfg = EvalConfig(benchmark=str(spaced_cmmlu_dir), split="dev", chat=False, scoring="letter",
                     num_shots=shots)
    _compare(shaken, spaced_cmmlu_dir, cfg, datasets_cache, 6)
