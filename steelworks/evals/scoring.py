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

import copy
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from steelworks.data.benchmarks import LETTERS, Item, Subject
from steelworks.evals.config import EvalConfig
from steelworks.evals.prompts import chat_prompt, item_prompts

log = logging.getLogger(__name__)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # No special tokens: a chat template renders its own, and a bare prompt is scored as text.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_all(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """``_encode`` of each text; one call for a fast tokenizer (its Rust side loops, not us)."""
    if getattr(tokenizer, "is_fast", False) and texts:
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return [_encode(tokenizer, t) for t in texts]


def _max_length(model: Any) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


# A prefix that a group's inputs share is run once and its key/value cache reused by each
# batch of the group (the C-Eval/CMMLU header is ~20-50 tokens of a ~100-150-token 0-shot
# prompt, and k shots are most of a k-shot one; 5,360 CMMLU questions scored in 36 s instead
# of 52 s, benchmarks/RESULTS.md).  Shorter shared prefixes are recomputed with each input:
# there the extra forward call and cache copies cost more than the tokens saved.
MIN_SHARED_PREFIX = 8


def score_continuations(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    batch_size: int = 16,
    progress: bool = False,
    groups: Sequence[Hashable] | None = None,
) -> list[list[float]]:
    """``out[i][j]`` = sum of log p(tokens of ``continuations[i][j]`` | ``contexts[i]``).

    Context and continuation are tokenized separately and concatenated (as lm-eval does), so
    the boundary between them is exact whatever the tokenizer would merge across it.
    ``groups`` (one key per context, e.g. the subject) marks contexts that likely share a
    prompt prefix: the token prefix common to a whole group is computed once (see
    ``MIN_SHARED_PREFIX``).  The scores are the same either way, to float rounding.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuation lists")
    if groups is not None and len(groups) != len(contexts):
        raise ValueError(f"{len(contexts)} contexts but {len(groups)} group keys")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    max_len = _max_length(model)
    # Each request is (index of its unique model input, its continuation ids).  The model
    # input is context + continuation minus the last token; single-token continuations of one
    # context (letter mode) therefore share one forward pass.
    inputs: dict[tuple[int, ...], int] = {}
    input_group: list[Hashable | None] = []  # None: never shares a prefix
    requests: list[list[tuple[int, list[int]]]] = []
    cont_ids_of: dict[str, list[int]] = {}  # letter mode encodes "A".."D" once, not per item
    truncated = 0
    for i, (ctx_ids, conts) in enumerate(zip(_encode_all(tokenizer, contexts), continuations,
                                             strict=True)):
        if not ctx_ids:
            raise ValueError(f"context {i} is empty after tokenization")
        row = []
        for cont in conts:
            if cont not in cont_ids_of:
                cont_ids_of[cont] = _encode(tokenizer, cont)
            cont_ids = cont_ids_of[cont]
            if not cont_ids:
                raise ValueError(f"continuation {cont!r} of context {i} is empty after tokenization")
            full = ctx_ids + cont_ids
            cut = max_len is not None and len(full) - 1 > max_len
            if cut:
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
            if key not in inputs:
                inputs[key] = len(inputs)
                # A cut input no longer starts with its group's prefix.
                input_group.append(None if groups is None or cut else groups[i])
            row.append((inputs[key], cont_ids))
        requests.append(row)
    if truncated:
        log.warning("%d request(s) exceeded %d tokens; their contexts were left-truncated",
                    truncated, max_len)

    unique = list(inputs)
    # The number of final positions each input needs logits for (its longest continuation).
    need = [1] * len(unique)
    for row in requests:
        for k, cont_ids in row:
            need[k] = max(need[k], len(cont_ids))

    logprobs = _forward_logprobs(model, tokenizer, unique,
                                 _plan(unique, input_group, need, batch_size), need, batch_size,
                                 progress)
    scores = []
    for row in requests:
        out = []
        for k, cont_ids in row:
            lp = logprobs[k][-len(cont_ids) :]  # positions predicting the continuation tokens
            out.append(float(lp.gather(-1, torch.tensor(cont_ids)[:, None]).sum()))
        scores.append(out)
    return scores


def _plan(unique: list[tuple[int, ...]], input_group: list[Hashable | None], need: list[int],
          batch_size: int) -> list[tuple[int, list[int]]]:
    """``[(shared prefix length, input indices)]``: each group with the token prefix all its
    inputs share (0 where that is under ``MIN_SHARED_PREFIX``, or where the group cannot fill
    one batch: those inputs are pooled and run whole, in full batches, since a group's batches
    hold only its own inputs), members longest first so batches pad little.  The prefix stops before every
    position an input is scored at (``need[k]`` from its end): those logits come from the run
    after the prefix.  Option-text continuations of one context share all of that context."""
    members: dict[Hashable | None, list[int]] = {}
    for k, g in enumerate(input_group):
        members.setdefault(g, []).append(k)
    plans: list[tuple[int, list[int]]] = []
    whole: list[int] = []
    for g, ks in members.items():
        seqs = [unique[k] for k in ks]
        # commonprefix compares element-wise, so it works on token tuples too.
        shared = 0 if g is None or len(ks) < max(2, batch_size) else min(
            len(os.path.commonprefix(seqs)), *(len(unique[k]) - need[k] for k in ks))
        if shared >= MIN_SHARED_PREFIX:
            plans.append((shared, sorted(ks, key=lambda k: -len(unique[k]))))
        else:
            whole += ks
    if whole:
        plans.append((0, sorted(whole, key=lambda k: -len(unique[k]))))
    return plans


@torch.inference_mode()
def _forward_logprobs(
    model: Any,
    tokenizer: Any,
    unique: list[tuple[int, ...]],
    plans: list[tuple[int, list[int]]],
    need: list[int],
    batch_size: int,
    progress: bool,
) -> list[torch.Tensor]:
    """For each unique input, log-softmax rows of its last ``need[k]`` positions (on CPU)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result: list[torch.Tensor | None] = [None] * len(unique)
    batches = [(shared, ks[b : b + batch_size])
               for shared, ks in plans for b in range(0, len(ks), batch_size)]
    # The longest first, so an out-of-memory batch size fails on the first batch, not the last.
    batches.sort(key=lambda sb: -len(unique[sb[1][0]]))
    prefix: tuple[tuple[int, ...], Any] | None = None  # (tokens, their cache), batch size 1
    for shared, batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
        if shared == 0:
            rows = _whole_batch(model, [unique[k] for k in batch], [need[k] for k in batch],
                                pad_id, device)
        else:
            head = unique[batch[0]][:shared]
            if prefix is None or prefix[0] != head:
                prefix = (head, model(input_ids=torch.tensor([head], device=device),
                                      use_cache=True, logits_to_keep=1).past_key_values)
            rows = _suffix_batch(model, prefix[1], [unique[k][shared:] for k in batch],
                                 [need[k] for k in batch], pad_id, device)
        for k, r in zip(batch, rows, strict=True):
            result[k] = torch.log_softmax(r.float(), dim=-1).cpu()
    return result  # type: ignore[return-value]


def _whole_batch(model: Any, seqs: list[tuple[int, ...]], need: list[int], pad_id: int,
                 device: Any) -> list[torch.Tensor]:
    """Logits of each sequence's last ``need`` positions, the sequences run whole."""
    width, keep = max(map(len, seqs)), max(need)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        # Left padding aligns every sequence's end, so `logits_to_keep` returns just the
        # final positions we score, instead of a batch x width x vocab logits tensor.
        ids[r, width - len(seq) :] = torch.tensor(seq)
        mask[r, width - len(seq) :] = 1
    # Positions count from each sequence's first real token, as in unbatched scoring.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=position_ids.to(device), logits_to_keep=keep,
                   use_cache=False).logits
    return [logits[r, keep - n :] for r, n in enumerate(need)]


def _suffix_batch(model: Any, prefix_cache: Any, suffixes: list[tuple[int, ...]],
                  need: list[int], pad_id: int, device: Any) -> list[torch.Tensor]:
    """Logits of each ``prefix + suffix``'s last ``need`` positions, the prefix read from its
    key/value cache.  Right padding: the suffixes then follow the prefix without a gap, every
    row's positions continue from the prefix's, and the causal mask alone keeps real tokens
    from seeing the padding after them, so no attention mask is needed."""
    width = max(map(len, suffixes))
    ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
    for r, suffix in enumerate(suffixes):
        ids[r, : len(suffix)] = torch.tensor(suffix)
    # Ask for logits only at the positions some row scores (rows end at different places).
    wanted = sorted({j for suffix, n in zip(suffixes, need, strict=True)
                     for j in range(len(suffix) - n, len(suffix))})
    column = {j: c for c, j in enumerate(wanted)}
    cache = copy.deepcopy(prefix_cache)  # the forward appends to it; the prefix is reused
    cache.batch_repeat_interleave(len(suffixes))
    logits = model(input_ids=ids.to(device), past_key_values=cache, use_cache=True,
                   logits_to_keep=torch.tensor(wanted, device=device)).logits
    return [logits[r, [column[j] for j in range(len(suffix) - n, len(suffix))]]
            for r, (suffix, n) in enumerate(zip(suffixes, need, strict=True))]


def build_requests(tokenizer: Any, items: Sequence[Item], subjects: Sequence[Subject], cfg: EvalConfig,
                   shots: Mapping[str, Sequence[Item]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Each item's context (prompt, chat-wrapped when ``cfg.chat``) and the four continuations
    to score after it (letters, or option texts). Shared by every backend."""
    contexts = [chat_prompt(tokenizer, p) if cfg.chat else p
                for p in item_prompts(items, subjects, cfg.num_shots, shots)]
    continuations = []
    for item in items:
        if cfg.scoring == "letter":
            continuations.append(list(LETTERS))
        else:
            # The answer the model would write: the option without the CSV's stray spaces (the
            # prompt keeps them, as lm-eval's does).  A leading space would make it score a
            # space after "答案：" and count it in the per-character normalisation.
            continuations.append([item.options[letter].strip() for letter in LETTERS])
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
    # Items of one subject share the header (and the shots): grouped, it is computed once.
    raw = score_continuations(model, tokenizer, contexts, continuations, cfg.batch_size, progress,
                              groups=[item.subject for item in items])
    return to_records(items, continuations, raw, cfg)
