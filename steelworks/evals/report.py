"""Accuracy aggregation and the report files of an evaluation.

Definitions (both are reported because papers use both and they can differ by points):

- micro accuracy: correct / n over all scored items of a group;
- macro accuracy: the unweighted mean of the group's per-subject accuracies, so a subject
  with 20 questions weighs as much as one with 200.

Beside the four categories, two cross-cutting groups are reported when any of their subjects
was evaluated: ``hard`` (C-Eval Hard, ``Subject.hard``) and ``china_specific`` (CMMLU's
China-specific subjects, ``Subject.china_specific``); the papers' tables have both.

Items without a gold answer (C-Eval test) are counted as ``unscored`` and left out of every
accuracy; a group with no scored item has accuracy None (JSON null), never 0.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steelworks.core.atomic import atomic_open, atomic_write_json, atomic_write_text
from steelworks.data.benchmarks import Subject

CHANCE = 0.25  # four options


def _acc(correct: int, n: int) -> float | None:
    return correct / n if n else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _group(names: list[str], per_subject: dict[str, dict[str, Any]]) -> dict[str, Any]:
    n = sum(per_subject[s]["n"] for s in names)
    correct = sum(per_subject[s]["correct"] for s in names)
    return {
        "n": n,
        "correct": correct,
        "acc": _acc(correct, n),
        "macro_acc": _mean([per_subject[s]["acc"] for s in names]),
        "subjects": names,
    }


def aggregate(predictions: Sequence[dict[str, Any]], subjects: Sequence[Subject]) -> dict[str, Any]:
    """Per-subject, per-category, overall and (when present) C-Eval Hard and CMMLU
    China-specific accuracies."""
    by_name = {s.name: s for s in subjects}
    per_subject: dict[str, dict[str, Any]] = {
        s.name: {"name_en": s.name_en, "name_zh": s.name_zh, "category": s.category,
                 "n": 0, "correct": 0, "unscored": 0}
        for s in subjects
    }
    for p in predictions:
        if p["subject"] not in by_name:
            raise ValueError(f"prediction for item {p['id']!r} has unknown subject {p['subject']!r}")
        stats = per_subject[p["subject"]]
        if p["correct"] is None:
            stats["unscored"] += 1
        else:
            stats["n"] += 1
            stats["correct"] += int(bool(p["correct"]))
    # Subjects with no prediction at all were not evaluated (e.g. max_items cut them).
    evaluated = [s.name for s in subjects if per_subject[s.name]["n"] + per_subject[s.name]["unscored"]]
    for stats in per_subject.values():
        stats["acc"] = _acc(stats["correct"], stats["n"])
    per_subject = {name: per_subject[name] for name in evaluated}

    categories: dict[str, list[str]] = {}
    for name in evaluated:
        categories.setdefault(by_name[name].category, []).append(name)

    overall = _group(evaluated, per_subject)
    report: dict[str, Any] = {
        "n": overall["n"],
        "correct": overall["correct"],
        "unscored": sum(s["unscored"] for s in per_subject.values()),
        "micro_acc": overall["acc"],
        "macro_acc": overall["macro_acc"],
        "subjects": per_subject,
        "categories": {cat: _group(names, per_subject) for cat, names in sorted(categories.items())},
    }
    # By the Subject's flag, not its name: CMMLU's high_school_physics is not C-Eval Hard.
    hard = [name for name in evaluated if by_name[name].hard]
    if hard:
        report["hard"] = _group(hard, per_subject)
    china = [name for name in evaluated if by_name[name].china_specific]
    if china:
        report["china_specific"] = _group(china, per_subject)
    return report


def _fmt(acc: float | None) -> str:
    return "-" if acc is None else f"{100 * acc:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Scored items: {report['n']} (unscored: {report['unscored']}). "
        f"Micro accuracy: {_fmt(report['micro_acc'])}%. Macro accuracy: {_fmt(report['macro_acc'])}%.",
        "",
        "## By category",
        "",
        "| category | subjects | n | correct | acc % (micro) | acc % (macro) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    groups = dict(report["categories"])
    if "hard" in report:
        groups["C-Eval Hard"] = report["hard"]
    if "china_specific" in report:
        groups["China-specific"] = report["china_specific"]
    for cat, g in groups.items():
        lines.append(f"| {cat} | {len(g['subjects'])} | {g['n']} | {g['correct']} | "
                     f"{_fmt(g['acc'])} | {_fmt(g['macro_acc'])} |")
    lines += ["", "## By subject", "",
              "| subject | 名称 | category | n | correct | acc % |", "|---|---|---|---:|---:|---:|"]
    for name, s in report["subjects"].items():
        lines.append(f"| {name} | {s['name_zh']} | {s['category']} | {s['n']} | {s['correct']} | "
                     f"{_fmt(s['acc'])} |")
    return "\n".join(lines) + "\n"


def render_category_chart(report: dict[str, Any]) -> bytes:
    """A PNG bar chart of micro accuracy per category (and overall), chance marked at 25%."""
    # Figure without pyplot: the Agg canvas, no global backend state, safe in worker threads.
    from matplotlib.figure import Figure

    labels = [*report["categories"], "Overall"]
    accs = [g["acc"] for g in report["categories"].values()] + [report["micro_acc"]]
    values = [100 * a if a is not None else 0.0 for a in accs]
    fig = Figure(figsize=(max(4.0, 1.2 * len(labels) + 1), 3.5), dpi=100)
    ax = fig.subplots()
    bars = ax.bar(labels, values, color=["tab:blue"] * (len(labels) - 1) + ["tab:gray"])
    for bar, acc in zip(bars, accs, strict=True):
        ax.annotate(_fmt(acc), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(100 * CHANCE, color="tab:red", linestyle="--", linewidth=1, label="chance (25%)")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy by category")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(
    report: dict[str, Any], predictions: Sequence[dict[str, Any]], out_dir: str | Path
) -> list[str]:
    """Write report.json, report.md and accuracy_by_category.png atomically; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "accuracy_by_category.png"]
    atomic_write_json(paths[0], {"summary": report, "predictions": list(predictions)})
    markdown = render_markdown(report)
    if "unparseable" in report:  # generative runs: what the extraction could not read
        from steelworks.evals.generative import format_unparseable  # pulls in the engine

        markdown += "\n" + format_unparseable(report["unparseable"])
    atomic_write_text(paths[1], markdown)
    png = render_category_chart(report)  # rendered first so a plotting error leaves no temp file
    with atomic_open(paths[2], "wb") as f:
        f.write(png)
    return [str(p) for p in paths]
