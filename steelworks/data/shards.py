"""Token shards: the input contract of train/.

A shard set is a directory with ``index.json`` and binary shards. Each shard holds
``num_sequences`` rows of ``seq_len`` tokens as raw little-endian ``dtype`` (uint16 when the
vocabulary fits, else uint32), and optionally a ``.mask`` file of the same shape in uint8:
1 where the token is a training target (SFT), absent for pretraining (every token counts).
The index records every shard's sha256 so a trainer can verify what it resumes on.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from steelworks.platform.atomic import atomic_open, atomic_write_json

INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class ShardInfo:
    file: str
    num_sequences: int
    sha256: str
    mask_file: str | None = None
    mask_sha256: str | None = None


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


def write_shard(path: Path, tokens: np.ndarray, dtype: np.dtype, mask: np.ndarray | None = None
                ) -> ShardInfo:
    """Write one shard (and its mask) atomically; returns its index entry."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [num_sequences, seq_len], got shape {tokens.shape}")
    if tokens.size and int(tokens.max()) >= np.iinfo(dtype).max + 1:
        raise ValueError(f"token id {int(tokens.max())} does not fit {dtype}")
    data = np.ascontiguousarray(tokens.astype(dtype)).astype(dtype.newbyteorder("<")).tobytes()
    with atomic_open(path, "wb") as f:
        f.write(data)
    info = ShardInfo(path.name, int(tokens.shape[0]), hashlib.sha256(data).hexdigest())
    if mask is not None:
        if mask.shape != tokens.shape:
            raise ValueError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
        mdata = np.ascontiguousarray(mask.astype(np.uint8)).tobytes()
        mpath = path.with_suffix(".mask")
        with atomic_open(mpath, "wb") as f:
            f.write(mdata)
        info.mask_file, info.mask_sha256 = mpath.name, hashlib.sha256(mdata).hexdigest()
    return info


def open_shard(directory: Path, index: ShardIndex, info: ShardInfo):
    """Memory-map one shard -> (tokens [n, seq_len], mask [n, seq_len] or None)."""
    dt = np.dtype(index.dtype).newbyteorder("<")
    tokens = np.memmap(directory / info.file, dtype=dt, mode="r",
                       shape=(info.num_sequences, index.seq_len))
    mask = None
    if info.mask_file:
        mask = np.memmap(directory / info.mask_file, dtype=np.uint8, mode="r",
                         shape=(info.num_sequences, index.seq_len))
    return tokens, mask


def verify_shard(directory: Path, info: ShardInfo) -> None:
    """Raise naming the shard if its bytes no longer match the recorded hash."""
    from steelworks.platform.atomic import sha256_file

    actual = sha256_file(directory / info.file)
    if actual != info.sha256:
        raise ValueError(f"shard {directory / info.file} changed: sha256 {actual} != {info.sha256}")
