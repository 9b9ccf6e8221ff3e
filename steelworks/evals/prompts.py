"""Each benchmark item's prompt, the one place every eval backend builds it: the exam text
(``data.exam_prompt``, the layout the SFT data teaches) with its shots, then, for chat models,
wrapped in the tokenizer's chat template as one user turn.

``item_prompts`` gives the text; the log-likelihood and HTTP backends wrap it with
``chat_prompt`` and tokenize, the generative backend hands it to the engine's chat encoder
(the same template). Shots are C-Eval's fixed dev items (``select_shots``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from steelworks.data.benchmarks import Item, Subject
from steelworks.data.exam_prompt import build_prompt


def select_shots(item: Item, pool: Sequence[Item], num_shots: int) -> list[Item]:
    """The first ``num_shots`` of ``pool`` (C-Eval's fixed dev shots), never the item itself."""
    if num_shots == 0:
        return []
    candidates = [s for s in pool if not (s.source == item.source and s.id == item.id)]
    if len(candidates) < num_shots:
        raise ValueError(
            f"subject {item.subject!r}: {num_shots} shots requested but only "
            f"{len(candidates)} dev item(s) available"
        )
    return candidates[:num_shots]


def item_prompts(items: Sequence[Item], subjects: Sequence[Subject], num_shots: int,
                 shots: Mapping[str, Sequence[Item]] | None = None) -> list[str]:
    """Each item's exam prompt (header, ``num_shots`` answered shots of its subject, the
    question), before any chat template."""
    by_name = {s.name: s for s in subjects}
    out = []
    for item in items:
        if item.subject not in by_name:
            raise ValueError(f"{item.source}:{item.line}: subject {item.subject!r} not in subjects")
        pool = (shots or {}).get(item.subject, [])
        out.append(build_prompt(by_name[item.subject].name_zh, item, select_shots(item, pool, num_shots)))
    return out


def chat_prompt(tokenizer: Any, prompt_text: str) -> str:
    """``prompt_text`` as one user turn with the assistant turn opened (ChatML for our models).

    The answer letter is then the first token an SFT model produces, the same position the
    SFT loss trained it on.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "evaluate with chat=False or load it with steelworks.data.tokenizer.load_tokenizer"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt_text}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):  # some transformers versions wrap single results
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text
