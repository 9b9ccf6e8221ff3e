"""Log-likelihood scoring of multiple-choice items with an in-process Hugging Face model.

Each choice is scored by the summed log-probability of its tokens given the prompt, the way
lm-eval's ``multiple_choice`` tasks do.  Two modes (``EvalConfig.scoring``):

- ``letter``: the continuations are "A".."D" right after the prompt, which ends in "答案："
  (for chat prompts, right after the opened assistant turn).  No space is inserted before
  the letter: C-Eval's own format and our SFT data put the letter directly after the cue.
- ``option_text``: each option's text is the continuation, and its log-likelihood is
  divided by its length in characters (lm-eval's ``acc_norm``), so long options are not
  penalised merely for having more tokens to pay for.  Characters, not tokens, so the
  normalisation does not depend on the tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from steelworks.evals.benchmarks import LETTERS, Item, Subject
from steelworks.evals.config import EvalConfig
from steelworks.evals.prompts import build_prompt, chat_prompt

log = logging.getLogger(__name__)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # No special tokens: a chat template renders its own, and a bare prompt is scored as text.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _max_length(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def score_continuations(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[float]]:
    """``out[i][j]`` = sum of log p(tokens of ``continuations[i][j]`` | ``contexts[i]``).

    Context and continuation are tokenized separately and concatenated (as lm-eval does), so
    the boundary between them is exact whatever the tokenizer would merge across it.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuation lists")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    max_len = _max_length(model)
    # Each request is (index of its unique model input, its continuation ids).  The model
    # input is context + continuation minus the last token; single-token continuations of one
    # context (letter mode) therefore share one forward pass.
    inputs: dict[tuple[int, ...], int] = {}
    requests: list[list[tuple[int, list[int]]]] = []
    truncated = 0
    for i, (context, conts) in enumerate(zip(contexts, continuations, strict=True)):
        ctx_ids = _encode(tokenizer, context)
        if not ctx_ids:
            raise ValueError(f"context {i} is empty after tokenization")
        row = []
        for cont in conts:
            cont_ids = _encode(tokenizer, cont)
            if not cont_ids:
                raise ValueError(f"continuation {cont!r} of context {i} is empty after tokenization")
            full = ctx_ids + cont_ids
            if max_len is not None and len(full) - 1 > max_len:
                if len(cont_ids) > max_len:
                    raise ValueError(
                        f"continuation {cont!r} has {len(cont_ids)} tokens, over the model's "
                        f"{max_len}-token window"
                    )
                # Drop the oldest context tokens (lm-eval does the same): the continuation and
                # the question nearest it matter most.
                full = full[len(full) - 1 - max_len :]
                truncated += 1
            key = tuple(full[:-1])
            row.append((inputs.setdefault(key, len(inputs)), cont_ids))
        requests.append(row)
    if truncated:
        log.warning("%d request(s) exceeded %d tokens; their contexts were left-truncated",
                    truncated, max_len)

    unique = list(inputs)
    # The longest first, so an out-of-memory batch size fails on the first batch, not the last.
    order = sorted(range(len(unique)), key=lambda k: -len(unique[k]))
    # The number of final positions each input needs logits for (its longest continuation).
    need = [1] * len(unique)
    for row in requests:
        for k, cont_ids in row:
            need[k] = max(need[k], len(cont_ids))

    logprobs = _forward_logprobs(model, tokenizer, unique, order, need, batch_size, progress)
    scores = []
    for row in requests:
        out = []
        for k, cont_ids in row:
            lp = logprobs[k][-len(cont_ids) :]  # positions predicting the continuation tokens
            out.append(float(lp.gather(-1, torch.tensor(cont_ids)[:, None]).sum()))
        scores.append(out)
    return scores


@torch.inference_mode()
def _forward_logprobs(
    model: Any,
    tokenizer: Any,
    unique: list[tuple[int, ...]],
    order: list[int],
    need: list[int],
    batch_size: int,
    progress: bool,
) -> list[torch.Tensor]:
    """For each unique input, log-softmax rows of its last ``need[k]`` positions (on CPU)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result: list[torch.Tensor | None] = [None] * len(unique)
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        width = max(len(unique[k]) for k in batch)
        keep = max(need[k] for k in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, k in enumerate(batch):
            seq = unique[k]
            # Left padding aligns every sequence's end, so `logits_to_keep` returns just the
            # final positions we score, instead of a batch x width x vocab logits tensor.
            ids[r, width - len(seq) :] = torch.tensor(seq)
            mask[r, width - len(seq) :] = 1
        # Positions count from each sequence's first real token, as in unbatched scoring.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=keep,
            use_cache=False,
        ).logits
        for r, k in enumerate(batch):
            rows = logits[r, keep - need[k] :].float()
            result[k] = torch.log_softmax(rows, dim=-1).cpu()
    return result  # type: ignore[return-value]


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


def build_requests(tokenizer: Any, items: Sequence[Item], subjects: Sequence[Subject], cfg: EvalConfig,
                   shots: Mapping[str, Sequence[Item]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Each item's context (prompt, chat-wrapped when ``cfg.chat``) and the four continuations
    to score after it (letters, or option texts). Shared by every backend."""
    by_name = {s.name: s for s in subjects}
    contexts, continuations = [], []
    for item in items:
        if item.subject not in by_name:
            raise ValueError(f"{item.source}:{item.line}: subject {item.subject!r} not in subjects")
        pool = (shots or {}).get(item.subject, [])
        prompt = build_prompt(by_name[item.subject].name_zh, item, select_shots(item, pool, cfg.num_shots))
        contexts.append(chat_prompt(tokenizer, prompt) if cfg.chat else prompt)
        if cfg.scoring == "letter":
            continuations.append(list(LETTERS))
        else:
            continuations.append([item.options[letter] for letter in LETTERS])
    return contexts, continuations


def to_records(items: Sequence[Item], continuations: Sequence[Sequence[str]],
               raw: Sequence[Sequence[float]], cfg: EvalConfig) -> list[dict[str, Any]]:
    """Continuation log-likelihoods -> one prediction record per item (option_text scores
    are normalised per character; ties go to the first letter)."""
    records = []
    for item, conts, item_scores in zip(items, continuations, raw, strict=True):
        if cfg.scoring == "option_text":
            item_scores = [s / len(text) for s, text in zip(item_scores, conts, strict=True)]
        best = max(range(len(LETTERS)), key=lambda j: item_scores[j])  # first on ties
        pred = LETTERS[best]
        records.append(
            {
                "subject": item.subject,
                "id": item.id,
                "answer": item.answer,
                "pred": pred,
                "scores": dict(zip(LETTERS, item_scores, strict=True)),
                "correct": None if item.answer is None else pred == item.answer,
            }
        )
    return records


def predict(
    model: Any,
    tokenizer: Any,
    items: Sequence[Item],
    subjects: Sequence[Subject],
    cfg: EvalConfig,
    shots: Mapping[str, Sequence[Item]] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Score every item's four choices; one record per item, in input order.

    Records are ``{subject, id, answer, pred, scores, correct}``; ``scores`` are per letter
    (normalised per character in option_text mode) and ``correct`` is None without a gold
    answer.  ``shots`` maps subject name -> dev items, used when ``cfg.num_shots > 0``.
    """
    contexts, continuations = build_requests(tokenizer, items, subjects, cfg, shots)
    model.eval()  # no dropout: scores must be deterministic
    raw = score_continuations(model, tokenizer, contexts, continuations, cfg.batch_size, progress)
    return to_records(items, continuations, raw, cfg)
