"""``steelworks eval compare A B``: line two evaluation runs up subject by subject and list
the items whose prediction flipped.

Versions of an SFT model are judged against each other, not in isolation: a 1-point change
in accuracy over a few hundred questions is noise unless one knows which items moved. A
run is an eval directory holding ``report.json`` (what ``write_report`` writes) or that
file itself. Only items present in both runs (same subject and id) are compared, so two
runs with different ``max_items`` still line up on what they share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steelworks.core.atomic import atomic_write_json, atomic_write_text


def load_run(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    """-> (summary, predictions keyed by (subject, id))."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{path}: no report.json (run `steelworks eval` first)")
    data = json.loads(file.read_text(encoding="utf-8"))
    if "summary" not in data or "predictions" not in data:
        raise ValueError(f"{file}: not an eval report (needs 'summary' and 'predictions')")
    preds: dict[tuple[str, str], dict[str, Any]] = {}
    for p in data["predictions"]:
        key = (str(p["subject"]), str(p["id"]))
        if key in preds:
            raise ValueError(f"{file}: item {key} appears twice")
        preds[key] = p
    return data["summary"], preds


def compare(a: str | Path, b: str | Path) -> dict[str, Any]:
    """Per-subject accuracy of both runs on their shared items, and the flipped items."""
    _, pa = load_run(a)
    _, pb = load_run(b)
    shared = sorted(set(pa) & set(pb))
    subjects: dict[str, dict[str, Any]] = {}
    flips: list[dict[str, Any]] = []
    for key in shared:
        x, y = pa[key], pb[key]
        if x["correct"] is None or y["correct"] is None:
            continue  # no gold answer: nothing to compare
        s = subjects.setdefault(key[0], {"n": 0, "a_correct": 0, "b_correct": 0, "gained": 0, "lost": 0})
        s["n"] += 1
        s["a_correct"] += int(bool(x["correct"]))
        s["b_correct"] += int(bool(y["correct"]))
        if bool(x["correct"]) != bool(y["correct"]):
            s["gained" if y["correct"] else "lost"] += 1
        if x.get("pred") != y.get("pred") or bool(x["correct"]) != bool(y["correct"]):
            flips.append({"subject": key[0], "id": key[1], "answer": x.get("answer"),
                          "a_pred": x.get("pred"), "b_pred": y.get("pred"),
                          "change": "gained" if y["correct"] and not x["correct"]
                          else "lost" if x["correct"] and not y["correct"] else "changed"})
    n = sum(s["n"] for s in subjects.values())
    for s in subjects.values():
        s["a_acc"], s["b_acc"] = s["a_correct"] / s["n"], s["b_correct"] / s["n"]
        s["delta"] = s["b_acc"] - s["a_acc"]
    total = {"n": n, "a_correct": sum(s["a_correct"] for s in subjects.values()),
             "b_correct": sum(s["b_correct"] for s in subjects.values()),
             "gained": sum(s["gained"] for s in subjects.values()),
             "lost": sum(s["lost"] for s in subjects.values())}
    if n:
        total["a_acc"], total["b_acc"] = total["a_correct"] / n, total["b_correct"] / n
    return {"a": str(a), "b": str(b), "shared_items": len(shared), "only_a": len(set(pa) - set(pb)),
            "only_b": len(set(pb) - set(pa)), "total": total, "subjects": subjects, "flips": flips}


def render_markdown(result: dict[str, Any], max_flips: int = 50) -> str:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    t = result["total"]
    lines = [f"# Eval comparison\n\nA: `{result['a']}`  \nB: `{result['b']}`\n",
             f"{result['shared_items']} shared items ({result['only_a']} only in A, "
             f"{result['only_b']} only in B).\n"]
    if t["n"]:
        lines.append(f"**Overall: A {pct(t['a_acc'])} → B {pct(t['b_acc'])}** "
                     f"({t['gained']} gained, {t['lost']} lost, net {t['gained'] - t['lost']:+d} of {t['n']})\n")
    lines += ["| subject | n | A acc | B acc | Δ | gained | lost |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in sorted(result["subjects"].items(), key=lambda kv: kv[1]["delta"]):
        lines.append(f"| {name} | {s['n']} | {pct(s['a_acc'])} | {pct(s['b_acc'])} | "
                     f"{100 * s['delta']:+.2f} | {s['gained']} | {s['lost']} |")
    flips = result["flips"]
    lines += ["", f"## Items that changed ({len(flips)})", "", "| subject | id | answer | A | B | change |",
              "|---|---|---|---|---|---|"]
    for f in flips[:max_flips]:
        lines.append(f"| {f['subject']} | {f['id']} | {f['answer']} | {f['a_pred']} | {f['b_pred']} | {f['change']} |")
    if len(flips) > max_flips:
        lines.append(f"\n… and {len(flips) - max_flips} more in compare.json")
    return "\n".join(lines) + "\n"


def write_comparison(result: dict[str, Any], out_dir: str | Path) -> list[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.md", render_markdown(result))
    return [str(out / "compare.json"), str(out / "compare.md")]
