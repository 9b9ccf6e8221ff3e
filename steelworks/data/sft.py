"""SFT samples: render conversations through the chat template with a loss mask.

The mask covers every assistant turn's content and its end token (<|im_end|>), and nothing
else: not the system/user turns, not the ``<|im_start|>assistant\\n`` header (Firefly's
rule). Spans are found by rendering prefixes of the conversation with the tokenizer's own
template, and mapped to tokens through the tokenizer's character offsets, so the tokens are
exactly those the model sees at inference.
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


def encode_conversation(tok, messages: list[dict[str, str]], seq_len: int
                        ) -> tuple[np.ndarray, np.ndarray, bool]:
    """-> (token ids [seq_len], loss mask [seq_len], truncated?) padded with pad_token_id."""
    messages = validate_messages(messages)
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [int(any(s <= a and b <= e for s, e in spans) and b > a) for a, b in offsets]
    truncated = len(ids) > seq_len
    ids, mask = ids[:seq_len], mask[:seq_len]
    pad = seq_len - len(ids)
    tokens = np.array(ids + [tok.pad_token_id] * pad, dtype=np.int64)
    return tokens, np.array(mask + [0] * pad, dtype=np.uint8), truncated
