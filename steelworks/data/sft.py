"""SFT samples: render conversations through the chat template with a loss mask.

The mask covers every assistant turn's content and its end token (<|im_end|>), and nothing
else: not the system/user turns, not the ``<|im_start|>assistant\\n`` header (Firefly's
rule). Spans are found by rendering prefixes of the conversation with the tokenizer's own
template, and mapped to tokens through the tokenizer's character offsets, so the tokens are
exactly those the model sees at inference.

``pack_samples`` packs several such samples (unpadded) into one row with per-sample segment
ids, so short conversations do not waste most of a row on padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ConversationError(ValueError):
    pass


def validate_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ConversationError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ConversationError(f"message {i} must be {{role: system|user|assistant, content: str}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("conversation has no assistant turn to learn from")
    return messages


def assistant_spans(tok, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans [start, end) to train on."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) \
            if i else len(tok.apply_chat_template([], tokenize=False, add_generation_prompt=True))
        seg_end = len(tok.apply_chat_template(messages[: i + 1], tokenize=False))
        rendered = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        # Train on content + end-of-turn token, not the newline the template adds after it.
        end = seg_end - (len(rendered) - len(rendered.rstrip("\n")))
        spans.append((start, end))
    return tok.apply_chat_template(messages, tokenize=False), spans


def encode_conversation(tok, messages: list[dict[str, str]], seq_len: int, pad: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, bool]:
    """-> (token ids, loss mask, truncated?), cut to ``seq_len`` tokens.

    ``pad=True``: both arrays are ``[seq_len]``, padded with pad_token_id / 0 (one sample per
    row). ``pad=False``: their own length (<= seq_len), for ``pack_samples``.
    """
    messages = validate_messages(messages)
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [int(any(s <= a and b <= e for s, e in spans) and b > a) for a, b in offsets]
    truncated = len(ids) > seq_len
    ids, mask = ids[:seq_len], mask[:seq_len]
    fill = seq_len - len(ids) if pad else 0
    tokens = np.array(ids + [tok.pad_token_id] * fill, dtype=np.int64)
    return tokens, np.array(mask + [0] * fill, dtype=np.uint8), truncated


# Segment ids are stored as uint16 (shards.py ``.seg``): at most this many samples per row.
MAX_SEGMENTS = (1 << 16) - 1


def pack_samples(samples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack unpadded (tokens, mask) samples into rows, keeping each sample whole.

    Greedy first-fit in input order: each sample goes into the first (lowest) row with room
    for it, else opens a new row -- deterministic, and within ~1.7x of optimal rows (usually
    far closer for many short samples). Returns ``tokens [n, seq_len]`` (int64, pad_id
    after the last sample), ``mask [n, seq_len]`` (uint8, 0 on padding) and
    ``segments [n, seq_len]`` (uint16: 1, 2, 3 ... for the row's samples in order, 0 on
    padding), from which a trainer derives document-causal attention and per-sample position
    ids. Samples stay contiguous, so the label of a sample's last token is the next sample's
    first token; that is never a target, because every sample begins with a prompt header
    whose mask is 0.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    lengths = []
    for i, (tokens, mask) in enumerate(samples):
        if len(tokens) != len(mask):
            raise ValueError(f"sample {i}: {len(tokens)} tokens but {len(mask)} mask entries")
        if not 0 < len(tokens) <= seq_len:
            raise ValueError(f"sample {i} has {len(tokens)} tokens; packing needs 1..{seq_len} "
                             "(encode_conversation(..., pad=False) truncates to seq_len)")
        lengths.append(len(tokens))
    row_of, start_of, rows = _first_fit(lengths, seq_len)
    out_tokens = np.full((rows, seq_len), pad_id, dtype=np.int64)
    out_mask = np.zeros((rows, seq_len), dtype=np.uint8)
    out_seg = np.zeros((rows, seq_len), dtype=np.uint16)
    used = np.zeros(rows, dtype=np.int64)  # samples placed so far per row -> next segment id
    for (tokens, mask), r, a, n in zip(samples, row_of, start_of, lengths):
        used[r] += 1
        if used[r] > MAX_SEGMENTS:
            raise ValueError(f"row {r} would hold more than {MAX_SEGMENTS} samples (uint16 ids)")
        out_tokens[r, a:a + n] = tokens
        out_mask[r, a:a + n] = mask
        out_seg[r, a:a + n] = used[r]
    return out_tokens, out_mask, out_seg


def _first_fit(lengths: list[int], seq_len: int) -> tuple[list[int], list[int], int]:
    """-> (row per sample, start column per sample, number of rows).

    A max-tree over the rows' free space finds the lowest row with room in O(log n), so
    first-fit stays fast for a million samples (the plain scan over open rows is quadratic).
    Unopened rows have seq_len free, so the lowest fitting row is a new one only when no
    open row fits -- exactly first-fit.
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [0] * size + [seq_len] * size  # leaves at [size, 2 size); internal nodes hold maxima
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows, starts, n_rows = [], [], 0
    for n in lengths:
        node = 1
        while node < size:  # descend to the leftmost leaf with free >= n
            node = 2 * node if free[2 * node] >= n else 2 * node + 1
        row = node - size
        rows.append(row)
        starts.append(seq_len - free[node])
        n_rows = max(n_rows, row + 1)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows, starts, n_rows
