"""The packed data loader with exactly resumable state.

Every rank sees the same seeded permutation of all sequences in the shard set; a step
consumes the next ``world * micro_batch * grad_accum`` positions and rank r takes its
contiguous slice, so shares are disjoint and deterministic. The state is two integers
(epoch, cursor) plus the shard list with hashes; restoring it continues with exactly the
next sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steelworks.data.shards import ShardIndex, open_shard, verify_shard


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L-1]
    labels: torch.Tensor  # [B, L-1], -100 where no loss
    num_targets: int


class PackedLoader:
    def __init__(self, directory: str | Path, rank: int, world: int, micro_batch: int,
                 grad_accum: int, seed: int) -> None:
        self.dir = Path(directory)
        self.index = ShardIndex.load(self.dir)
        self.rank, self.world, self.micro, self.accum, self.seed = rank, world, micro_batch, grad_accum, seed
        self.arrays = [open_shard(self.dir, self.index, s) for s in self.index.shards]
        self.offsets = np.cumsum([0] + [s.num_sequences for s in self.index.shards])
        self.epoch, self.cursor = 0, 0
        if self.global_batch > len(self):
            raise ValueError(f"{self.dir}: {len(self)} sequences < one global batch "
                             f"({self.global_batch}); lower micro_batch_size or add data")
        self._perm = self._permutation(0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def global_batch(self) -> int:
        return self.world * self.micro * self.accum

    @property
    def steps_per_epoch(self) -> int:
        return len(self) // self.global_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        tokens, mask = self.arrays[s]
        j = i - int(self.offsets[s])
        return tokens[j], (mask[j] if mask is not None else None)

    def next_step(self) -> list[Batch]:
        """The ``grad_accum`` micro batches of this rank for the next optimizer step."""
        if self.cursor + self.global_batch > len(self):  # drop the epoch's remainder
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        start = self.cursor + self.rank * self.micro * self.accum
        mine = self._perm[start : start + self.micro * self.accum]
        self.cursor += self.global_batch
        out = []
        for k in range(self.accum):
            rows = [self._row(int(i)) for i in mine[k * self.micro : (k + 1) * self.micro]]
            tokens = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
            labels = tokens[:, 1:].clone()
            inputs = tokens[:, :-1]
            if rows[0][1] is not None:
                mask = torch.from_numpy(np.stack([r[1] for r in rows]).astype(bool))
                labels[~mask[:, 1:]] = -100
                # SFT rows are padded at the end: drop the columns after the last target in
                # the batch. Exact (causal attention: earlier positions never see them) and
                # it stops short samples paying for the longest one's padding.
                targets = (labels != -100).any(0).nonzero()
                if len(targets):
                    keep = int(targets[-1]) + 1
                    inputs, labels = inputs[:, :keep], labels[:, :keep]
            out.append(Batch(inputs, labels, int((labels != -100).sum())))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "shards": [{"file": s.file, "sha256": s.sha256} for s in self.index.shards]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        recorded = {s["file"]: s["sha256"] for s in state["shards"]}
        for info in self.index.shards:
            if info.file in recorded:
                if recorded[info.file] != info.sha256:
                    raise ValueError(f"shard {info.file} differs from the one trained on")
                verify_shard(self.dir, info)
        missing = sorted(set(recorded) - {s.file for s in self.index.shards})
        if missing:
            raise ValueError(f"shards trained on are missing from {self.dir}: {missing}")
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)
