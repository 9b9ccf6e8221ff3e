"""`steelworks eval compare A B`: per-subject deltas on shared items and the flipped items,
checked against hand-counted numbers."""

from __future__ import annotations

import json

import pytest

from steelworks.evals.compare import compare, render_markdown


def _run(path, preds):
    path.mkdir()
    rows = [{"subject": s, "id": i, "answer": ans, "pred": pred, "scores": {},
             "correct": None if ans is None else pred == ans} for s, i, ans, pred in preds]
    (path / "report.json").write_text(json.dumps({"summary": {}, "predictions": rows}))
    return path


def test_compare_counts_gains_losses_and_shared_items(tmp_path):
    a = _run(tmp_path / "a", [("math", "0", "A", "A"), ("math", "1", "B", "C"), ("math", "2", "C", "C"),
                              ("law", "0", "D", "A"), ("law", "1", "A", "A"), ("law", "9", "B", "B"),
                              ("law", "5", None, "A")])
    b = _run(tmp_path / "b", [("math", "0", "A", "B"), ("math", "1", "B", "B"), ("math", "2", "C", "C"),
                              ("law", "0", "D", "B"), ("law", "1", "A", "A"), ("law", "5", None, "C"),
                              ("art", "0", "A", "A")])
    r = compare(a, b)
    assert (r["shared_items"], r["only_a"], r["only_b"]) == (6, 1, 1)
    # math: A right on 0 and 2, B right on 1 and 2 -> one gained, one lost
    assert r["subjects"]["math"] == {"n": 3, "a_correct": 2, "b_correct": 2, "gained": 1, "lost": 1,
                                     "a_acc": 2 / 3, "b_acc": 2 / 3, "delta": 0.0}
    # law: item 0 wrong in both but the prediction moved (A -> B); item 5 has no gold answer
    assert r["subjects"]["law"]["n"] == 2 and r["subjects"]["law"]["gained"] == r["subjects"]["law"]["lost"] == 0
    assert {(f["subject"], f["id"], f["change"]) for f in r["flips"]} == {
        ("math", "0", "lost"), ("math", "1", "gained"), ("law", "0", "changed")}
    assert r["total"]["n"] == 5 and r["total"]["a_acc"] == pytest.approx(3 / 5) == r["total"]["b_acc"]
    md = render_markdown(r)
    assert "| math | 3 | 66.67 | 66.67 | +0.00 | 1 | 1 |" in md and "net +0 of 5" in md


def test_compare_cli_and_bad_input(tmp_path, capsys):
    from steelworks.platform.cli import main

    a = _run(tmp_path / "a", [("math", "0", "A", "A")])
    b = _run(tmp_path / "b", [("math", "0", "A", "B")])
    assert main(["eval", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "A 100.00 → B 0.00" in out and (tmp_path / "cmp" / "compare.json").exists()
    assert main(["eval", "compare", str(a), str(tmp_path / "missing")]) == 2
    assert "no report.json" in capsys.readouterr().err
    assert main(["eval", "compare", str(a)]) == 2
