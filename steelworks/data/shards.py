"""Token shards: the input contract of train/.

A shard set is a directory with ``index.json`` and binary shards. Each shard holds
``num_sequences`` rows of ``seq_len`` tokens as raw little-endian ``dtype`` (uint16 when the
vocabulary fits, else uint32), and optionally a ``.mask`` file of the same shape in uint8:
1 where the token is a training target (SFT), absent for pretraining (every token counts).
Packed SFT shards (several conversations per row) add a ``.seg`` file of the same shape in
little-endian uint16: 1, 2, 3 ... for the row's samples, 0 on padding, from which a trainer
builds document-causal attention masks and per-sample position ids (``open_segments``).
The index records every file's sha256 so a trainer can verify what it resumes on; index
files written before ``.seg`` existed load unchanged (the seg fields default to None).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from steelworks.core.atomic import atomic_open, atomic_write_json

INDEX = "index.json"
SEG_DTYPE = np.dtype("<u2")  # segment ids: little-endian uint16, whatever the host order


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class ShardInfo:
    file: str
    num_sequences: int
    sha256: str
    mask_file: str | None = None
    mask_sha256: str | None = None
    seg_file: str | None = None
    seg_sha256: str | None = None


@dataclass
class ShardIndex:
    seq_len: int
    dtype: str
    vocab_size: int
    pad_id: int
    kind: str  # "pretrain" (packed documents) or "sft" (one sample per row, with masks)
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def num_sequences(self) -> int:
        return sum(s.num_sequences for s in self.shards)

    def save(self, directory: str | Path) -> None:
        atomic_write_json(Path(directory) / INDEX, asdict(self))

    @classmethod
    def load(cls, directory: str | Path) -> ShardIndex:
        import json

        path = Path(directory) / INDEX
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: {directory} is not a shard directory")
        data = json.loads(path.read_text())
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**data)


def write_shard(path: Path, tokens: np.ndarray, dtype: np.dtype, mask: np.ndarray | None = None,
                segments: np.ndarray | None = None) -> ShardInfo:
    """Write one shard (and its mask and segment ids) atomically; returns its index entry.

    Every array is checked before any file is written, so bad input leaves nothing behind.
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [num_sequences, seq_len], got shape {tokens.shape}")
    if tokens.size and int(tokens.max()) >= np.iinfo(dtype).max + 1:
        raise ValueError(f"token id {int(tokens.max())} does not fit {dtype}")
    for what, arr in (("mask", mask), ("segments", segments)):
        if arr is not None and arr.shape != tokens.shape:
            raise ValueError(f"{what} shape {arr.shape} != tokens shape {tokens.shape}")
    if segments is not None and segments.size and \
            (int(segments.min()) < 0 or int(segments.max()) > np.iinfo(SEG_DTYPE).max):
        raise ValueError(f"segment ids must lie in 0..65535, got {int(segments.min())}.."
                         f"{int(segments.max())}")
    data = np.ascontiguousarray(tokens.astype(dtype)).astype(dtype.newbyteorder("<")).tobytes()
    with atomic_open(path, "wb") as f:
        f.write(data)
    info = ShardInfo(path.name, int(tokens.shape[0]), hashlib.sha256(data).hexdigest())
    if mask is not None:
        info.mask_file, info.mask_sha256 = _write_side(path.with_suffix(".mask"), mask, np.dtype(np.uint8))
    if segments is not None:
        info.seg_file, info.seg_sha256 = _write_side(path.with_suffix(".seg"), segments, SEG_DTYPE)
    return info


def _write_side(path: Path, arr: np.ndarray, dtype: np.dtype) -> tuple[str, str]:
    data = np.ascontiguousarray(arr.astype(dtype)).tobytes()
    with atomic_open(path, "wb") as f:
        f.write(data)
    return path.name, hashlib.sha256(data).hexdigest()


def open_shard(directory: Path, index: ShardIndex, info: ShardInfo
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-map one shard -> (tokens [n, seq_len], mask [n, seq_len] or None)."""
    dt = np.dtype(index.dtype).newbyteorder("<")
    tokens = np.memmap(directory / info.file, dtype=dt, mode="r",
                       shape=(info.num_sequences, index.seq_len))
    mask = None
    if info.mask_file:
        mask = np.memmap(directory / info.mask_file, dtype=np.uint8, mode="r",
                         shape=(info.num_sequences, index.seq_len))
    return tokens, mask


def open_segments(directory: Path, index: ShardIndex, info: ShardInfo) -> np.ndarray | None:
    """Memory-map one shard's segment ids [n, seq_len] (uint16), or None if it has none.

    A separate function rather than a third element of ``open_shard``, whose callers unpack
    exactly two values.
    """
    if not info.seg_file:
        return None
    return np.memmap(directory / info.seg_file, dtype=SEG_DTYPE, mode="r",
                     shape=(info.num_sequences, index.seq_len))


def verify_shard(directory: Path, info: ShardInfo) -> None:
    """Raise naming the file if the shard's tokens, mask or segment ids no longer match the
    hashes recorded for them (a file recorded without a hash, as in old indexes, is skipped)."""
    from steelworks.core.atomic import sha256_file

    for name, expected in ((info.file, info.sha256), (info.mask_file, info.mask_sha256),
                           (info.seg_file, info.seg_sha256)):
        if not name or not expected:
            continue
        actual = sha256_file(directory / name)
        if actual != expected:
            raise ValueError(f"shard {directory / name} changed: sha256 {actual} != {expected}")
