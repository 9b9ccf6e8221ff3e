"""Generative scoring: the model writes its answer and extract.py reads the letter from it.

Log-likelihood scoring (scoring.py) asks which letter the model finds most likely; this path
asks what it actually says, which is what a chat user sees and what papers that report
"generation" accuracy measure.  The prompts are exactly those of scoring.py (same header,
shots and chat template), so the two accuracies differ only in how the answer is taken.

Decoding is greedy (temperature 0) so a run is reproducible.  Every item is submitted to
the engine at once from a pool of ``engine.max_batch_size`` threads: the engine's
continuous batching decodes them together, and since a batched row computes what it
computes alone (tests/test_engine_batching.py), batching does not change any answer.

A reply no extraction rule can read is *wrong*, not skipped: it stays in the denominator
(``pred`` None, ``correct`` False), because a model that cannot answer in the expected
format has failed the question.  ``unparseable_summary`` counts and lists those replies so
a report shows how much of the accuracy gap is format rather than knowledge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Protocol

from tqdm.auto import tqdm

from steelworks.data.benchmarks import Item, Subject
from steelworks.evals.config import EvalConfig
from steelworks.evals.extract import RULE_UNPARSEABLE, RULES, extract_answer
from steelworks.evals.prompts import item_prompts
from steelworks.inference.sampling import SamplingParams

# Base (non-chat) prompts end "答案：" and every shot ends "答案：X\n\n": after its answer a
# base model goes on to write the next question, so a blank line ends the reply.
BASE_STOP = ["\n\n"]


class GenerationEngine(Protocol):
    """What this module needs of an engine (serve.engine.Engine, or a test double)."""

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]: ...

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Any: ...


def build_prompt_ids(
    engine: GenerationEngine,
    items: Sequence[Item],
    subjects: Sequence[Subject],
    cfg: EvalConfig,
    shots: Mapping[str, Sequence[Item]] | None = None,
) -> list[list[int]]:
    """Token ids of each item's prompt: scoring.predict's text, as one chat turn if cfg.chat."""
    # The same template chat_prompt renders for the log-likelihood path.
    return [engine.encode_chat([{"role": "user", "content": p}]) if cfg.chat else engine.encode(p)
            for p in item_prompts(items, subjects, cfg.num_shots, shots)]


def _record(item: Item, reply: str) -> dict[str, Any]:
    pred, rule = extract_answer(reply, item.options)
    return {
        "subject": item.subject,
        "id": item.id,
        "answer": item.answer,
        "pred": pred,
        "scores": None,  # no per-letter scores when the model generates
        # Unparseable (pred None) is wrong whenever there is a gold answer.
        "correct": None if item.answer is None else pred == item.answer,
        "reply": reply,
        "rule": rule,
        "parsed": pred is not None,
    }


def predict_generative(
    engine: GenerationEngine,
    items: Sequence[Item],
    subjects: Sequence[Subject],
    cfg: EvalConfig,
    shots: Mapping[str, Sequence[Item]] | None = None,
    max_tokens: int = 32,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Generate a greedy reply per item and read its letter; one record per item, in order.

    Records are scoring.predict's ``{subject, id, answer, pred, scores, correct}`` (``scores``
    None) plus ``reply`` (the generated text), ``rule`` (the extract.py rule that read it)
    and ``parsed``.  ``shots`` maps subject name -> dev items, used when cfg.num_shots > 0.
    """
    prompt_ids = build_prompt_ids(engine, items, subjects, cfg, shots)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, stop=[] if cfg.chat else list(BASE_STOP)
    )
    replies: list[str | None] = [None] * len(items)
    # No more threads than batch rows: extra requests would only wait in the engine's queue,
    # and a bounded queue (QueueFullError) must never be what limits an evaluation.
    workers = max(1, int(getattr(engine, "max_batch_size", 1)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gen-eval") as pool:
        futures = {pool.submit(engine.generate, ids, params): i for i, ids in enumerate(prompt_ids)}
        done = as_completed(futures)
        for future in tqdm(done, total=len(futures), desc="generating", unit="item",
                           disable=not progress):
            i = futures[future]
            try:
                replies[i] = future.result().text
            except Exception as e:
                for f in futures:
                    f.cancel()  # queued items need not run once the evaluation has failed
                item = items[i]
                raise RuntimeError(
                    f"{item.source}:{item.line}: generation failed for item {item.id!r} "
                    f"({item.subject}): {e}"
                ) from e
    return [_record(item, reply or "") for item, reply in zip(items, replies, strict=True)]


def unparseable_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How many replies each extraction rule read, and every unparseable one listed.

    ``{"n", "parsed", "unparseable", "unparseable_rate", "by_rule": {rule: count},
    "by_subject": {subject: unparseable count}, "items": [{subject, id, answer, reply}]}``;
    ``by_rule`` covers every rule (zeros included) so reports line up across runs.
    """
    by_rule = dict.fromkeys(RULES, 0)
    by_subject: dict[str, int] = {}
    listed = []
    for r in records:
        by_rule[r["rule"]] = by_rule.get(r["rule"], 0) + 1
        if not r["parsed"]:
            by_subject[r["subject"]] = by_subject.get(r["subject"], 0) + 1
            listed.append({"subject": r["subject"], "id": r["id"], "answer": r["answer"],
                           "reply": r["reply"]})
    n = len(records)
    return {
        "n": n,
        "parsed": n - len(listed),
        "unparseable": len(listed),
        "unparseable_rate": len(listed) / n if n else None,
        "by_rule": by_rule,
        "by_subject": by_subject,
        "items": listed,
    }


def format_unparseable(summary: Mapping[str, Any], max_listed: int = 20) -> str:
    """A Markdown section for a report: the counts, then up to ``max_listed`` replies."""
    lines = ["## Unparseable replies", ""]
    rate = summary["unparseable_rate"]
    lines.append(
        f"{summary['unparseable']} of {summary['n']} replies had no readable answer"
        + (f" ({rate:.1%}); they count as wrong." if rate is not None else ".")
    )
    rules = ", ".join(f"{k}: {v}" for k, v in summary["by_rule"].items() if k != RULE_UNPARSEABLE)
    lines += ["", f"Read by rule: {rules}."]
    if summary["items"]:
        lines += ["", "| subject | id | gold | reply |", "|---|---|---|---|"]
        for it in summary["items"][:max_listed]:
            reply = it["reply"].replace("\n", "\\n").replace("|", "\\|")
            reply = reply if len(reply) <= 80 else reply[:77] + "..."
            lines.append(f"| {it['subject']} | {it['id']} | {it['answer'] or ''} | {reply} |")
        if len(summary["items"]) > max_listed:
            lines.append(f"\n({len(summary['items']) - max_listed} more not shown)")
    return "\n".join(lines) + "\n"
