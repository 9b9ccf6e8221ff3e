"""Byte-level BPE tokenizer trained locally with HF ``tokenizers``, saved as a standard HF
tokenizer directory (``AutoTokenizer.from_pretrained(dir)`` loads it) with ChatML special
tokens and a chat template, the conventions Qwen2 uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

# ChatML, as Qwen2 renders it. `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenization split: runs of letters (Han included, so BPE learns multi-character
# Chinese words), single digits, punctuation runs, whitespace.
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2):
    """Train BPE on ``texts`` and save an HF tokenizer directory at ``out_dir``.

    Returns the loaded ``PreTrainedTokenizerFast``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_split_pattern(), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return save_hf_tokenizer(tok, out_dir)


def _split_pattern():
    from tokenizers import Regex

    return Regex(_SPLIT)


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | Path):
    """Wrap a raw ``tokenizers.Tokenizer`` as ``PreTrainedTokenizerFast`` and save it."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,  # chat models stop at the end of the assistant turn (Qwen2 convention)
        pad_token=EOS,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


# tokenizer_class of a plain fast tokenizer (ours): transformers 5 calls it TokenizersBackend
_GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path):
    """Load a local HF tokenizer directory (never the hub) and check it has what we need."""
    path = Path(path)
    if not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face tokenizer directory")
    config = path / "tokenizer_config.json"
    cls = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class") if config.exists() else None
    if cls in _GENERIC_FAST and (path / "tokenizer.json").exists():
        # The class AutoTokenizer would pick anyway, without its auto module, which imports
        # torch (4 s in every process that packs or serves; 0.9 s this way).
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def document_end_id(tok) -> int:
    """The token that separates packed pretraining documents: <|endoftext|> if present."""
    tid = tok.convert_tokens_to_ids(EOS)
    if tid is None or tid == tok.unk_token_id:
        tid = tok.eos_token_id
    return int(tid)


def tokenizer_summary(path: str | Path) -> dict:
    tok = load_tokenizer(path)
    return {
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "pad_token_id": tok.pad_token_id,
        "document_end_id": document_end_id(tok),
        "special_tokens": json.loads(json.dumps(tok.special_tokens_map)),
    }
