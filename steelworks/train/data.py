"""The packed data loader with exactly resumable, appendable state.

Order. All shard sets given (the run's data directory plus any appended ones) form one list
of sequences with global ids. Every rank computes the same seeded order of the epoch; a
step consumes the next ``world * micro_batch * grad_accum`` positions and rank r takes its
contiguous slice, so shares are disjoint and deterministic, and a cursor is all the
progress there is to save.

Appending. When a resumed run finds shards it has not trained on, it records an *append*
at the current cursor: the order up to the cursor is kept, and the not-yet-trained
remainder is shuffled together with the new sequences (seeded by the append's index).
Sequences already trained on are never repeated in the epoch, and every new one comes
exactly once. The next epoch is a fresh permutation of everything. The state is the
shard list (with content hashes), the seed, the epoch, the cursor and the appends of the
current epoch: a few integers, however large the corpus. The order itself is computed, not
stored (``EpochOrder``, a keyed Feistel permutation): memory does not grow with the corpus.

Packed SFT rows carry segment ids (``.seg``): position ids restart at every sample, which
makes ``transformers`` build a block-diagonal causal mask (SDPA) or varlen calls
(flash-attn), so packed samples never attend to each other; ``sample_ids`` lets the loss
average per sample rather than per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steelworks.data.shards import ShardIndex, ShardInfo, open_segments, open_shard, verify_shard
from steelworks.train.permutation import FeistelPermutation


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L-1]
    labels: torch.Tensor  # [B, L-1], -100 where no loss
    num_targets: int
    position_ids: torch.Tensor | None = None  # [B, L-1] restarting per packed sample
    sample_ids: torch.Tensor | None = None  # [B, L-1] sample of each target (0: none)


@dataclass
class _Shard:
    directory: Path
    index: ShardIndex
    info: ShardInfo

    @property
    def name(self) -> str:
        return str(self.directory / self.info.file)


def _open_sets(directories: Sequence[str | Path]) -> list[_Shard]:
    shards: list[_Shard] = []
    first: ShardIndex | None = None
    for d in directories:
        d = Path(d)
        index = ShardIndex.load(d)
        if first is None:
            first = index
        for field in ("seq_len", "kind", "vocab_size"):
            if getattr(index, field) != getattr(first, field):
                raise ValueError(f"{d}: {field}={getattr(index, field)!r} differs from "
                                 f"{directories[0]} ({getattr(first, field)!r}); shard sets "
                                 f"trained together must come from the same tokenizer and packing")
        shards += [_Shard(d, index, s) for s in index.shards]
    by_hash: dict[str, str] = {}
    for s in shards:
        if s.info.sha256 in by_hash:
            raise ValueError(f"shard {s.name} has the same content (sha256 {s.info.sha256[:12]}...) "
                             f"as {by_hash[s.info.sha256]}; adding it again would repeat its sequences")
        by_hash[s.info.sha256] = s.name
    return shards


class EpochOrder:
    """Position in the epoch -> global sequence id, computed on demand (O(appends) memory).

    Without appends it is one keyed permutation of all sequences (``permutation.py``). The
    k-th append (``{"cursor", "known"}``) keeps positions before its cursor, and spreads
    what was left of the previous order together with the new ids ``known..end`` over the
    rest with its own permutation: position ``p >= cursor`` takes entry ``q = P_k(p - cursor)``
    of that remainder, which is either the previous order's position ``cursor + q`` or the
    new id ``known + q - (known - cursor)``. This is the same rule the loader applied to a
    stored array before; an order is now a few keys, not 8 bytes per sequence."""

    def __init__(self, seed: int, epoch: int, appends: Sequence[dict[str, int]], total: int) -> None:
        first = appends[0]["known"] if appends else total
        self.base = FeistelPermutation(first, [seed, epoch])
        bounds = [a["known"] for a in appends[1:]] + [total]
        self.levels = [(a["cursor"], a["known"], FeistelPermutation(end - a["cursor"], [seed, epoch, k]))
                       for k, (a, end) in enumerate(zip(appends, bounds), start=1)]
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, where: slice) -> np.ndarray:
        p = np.arange(*where.indices(self.total), dtype=np.int64)
        out = np.empty_like(p)
        todo = np.ones(len(p), dtype=bool)
        for cursor, known, perm in reversed(self.levels):
            moved = todo & (p >= cursor)
            if moved.any():
                q = perm[p[moved] - cursor]
                new = q >= known - cursor
                idx = np.flatnonzero(moved)
                out[idx[new]] = known + q[new] - (known - cursor)
                todo[idx[new]] = False
                p[idx[~new]] = cursor + q[~new]
        if todo.any():
            out[todo] = self.base[p[todo]]
        return out


class PackedLoader:
    def __init__(self, directories: str | Path | Sequence[str | Path], rank: int, world: int,
                 micro_batch: int, grad_accum: int, seed: int) -> None:
        if isinstance(directories, (str, Path)):
            directories = [directories]
        self.dirs = [Path(d) for d in directories]
        self.rank, self.world, self.micro, self.accum, self.seed = rank, world, micro_batch, grad_accum, seed
        self._set_shards(_open_sets(self.dirs))
        # A shard damaged since the tokenizer stage wrote it would feed garbage silently:
        # check every file against its recorded sha256 before the first step. The ranks
        # split the work (shard k on rank k % world), so a 1T-token run hashes its ~2 TB
        # once in all rather than once per GPU; the rank that finds one fails the group.
        for k, shard in enumerate(self.shards):
            if k % world == rank:
                verify_shard(shard.directory, shard.info)
        self.epoch, self.cursor = 0, 0
        self.appends: list[dict[str, int]] = []  # this epoch's: {"cursor", "known"}
        self.appended: list[str] = []  # shards added at this resume (for the log)
        if self.global_batch > len(self):
            raise ValueError(f"{', '.join(map(str, self.dirs))}: {len(self)} sequences < one global "
                             f"batch ({self.global_batch}); lower micro_batch_size or add data")
        self._order = self._epoch_order()

    def _set_shards(self, shards: list[_Shard]) -> None:
        self.shards = shards
        self.index = shards[0].index  # seq_len, kind and vocab are the same for all
        self.arrays = [open_shard(s.directory, s.index, s.info) for s in shards]
        self.segments = [open_segments(s.directory, s.index, s.info) for s in shards]
        self.offsets = np.cumsum([0] + [s.info.num_sequences for s in shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def global_batch(self) -> int:
        return self.world * self.micro * self.accum

    @property
    def seq_len(self) -> int:
        """Tokens per training row (a packed row of seq_len + 1 gives seq_len inputs)."""
        return self.index.seq_len - 1

    @property
    def steps_per_epoch(self) -> int:
        return len(self) // self.global_batch

    def _epoch_order(self) -> EpochOrder:
        """The epoch's sequence order, replaying its appends (see the module docstring)."""
        return EpochOrder(self.seed, self.epoch, self.appends, len(self))

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        tokens, mask = self.arrays[s]
        seg = self.segments[s]
        j = i - int(self.offsets[s])
        return tokens[j], (mask[j] if mask is not None else None), (seg[j] if seg is not None else None)

    def next_step(self) -> list[Batch]:
        """The ``grad_accum`` micro batches of this rank for the next optimizer step."""
        if self.cursor + self.global_batch > len(self):  # drop the epoch's remainder
            self.epoch, self.cursor, self.appends = self.epoch + 1, 0, []
            self._order = self._epoch_order()
        start = self.cursor + self.rank * self.micro * self.accum
        mine = self._order[start : start + self.micro * self.accum]
        self.cursor += self.global_batch
        return [self._batch([self._row(int(i)) for i in mine[k * self.micro:(k + 1) * self.micro]])
                for k in range(self.accum)]

    @staticmethod
    def _batch(rows: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]) -> Batch:
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
        labels = tokens[:, 1:].clone()
        inputs = tokens[:, :-1]
        position_ids = sample_ids = None
        if rows[0][1] is not None:
            mask = torch.from_numpy(np.stack([r[1] for r in rows]).astype(bool))
            labels[~mask[:, 1:]] = -100
        if rows[0][2] is not None:
            seg = torch.from_numpy(np.stack([r[2] for r in rows]).astype(np.int64))
            # A token never predicts the first token of the next sample.
            labels[seg[:, 1:] != seg[:, :-1]] = -100
            sample_ids = torch.where(labels != -100, seg[:, 1:], 0)
            # Positions restart at each sample: index within the run of equal segment ids.
            starts = torch.ones_like(seg, dtype=torch.bool)
            starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
            idx = torch.arange(seg.size(1)).expand_as(seg)
            run_start = torch.cummax(torch.where(starts, idx, 0), dim=1).values
            position_ids = (idx - run_start)[:, :-1]
        elif rows[0][1] is not None:
            sample_ids = (labels != -100).long()  # one sample per row
        if rows[0][1] is not None:
            # SFT rows are padded at the end: drop the columns after the last target in the
            # batch. Exact (causal attention: earlier positions never see them) and it stops
            # short samples paying for the longest one's padding.
            targets = (labels != -100).any(0).nonzero()
            if len(targets):
                keep = int(targets[-1]) + 1
                inputs, labels = inputs[:, :keep], labels[:, :keep]
                position_ids = position_ids[:, :keep] if position_ids is not None else None
                sample_ids = sample_ids[:, :keep]
        return Batch(inputs, labels, int((labels != -100).sum()), position_ids, sample_ids)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "appends": [dict(a) for a in self.appends],
                "shards": [{"file": s.name, "sha256": s.info.sha256,
                            "num_sequences": s.info.num_sequences} for s in self.shards]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress; verify the shards trained on; register new shards as an append."""
        by_hash = {s.info.sha256: s for s in self.shards}
        known: list[_Shard] = []
        for rec in state["shards"]:
            shard = by_hash.pop(rec["sha256"], None)
            if shard is None:
                raise ValueError(f"shard {rec['file']} (sha256 {rec['sha256'][:12]}...) was trained on "
                                 f"but is missing or changed in {', '.join(map(str, self.dirs))}")
            known.append(shard)  # its bytes were checked against the index in __init__
        new = [s for s in self.shards if s.info.sha256 in by_hash]
        self._set_shards(known + new)  # global ids: what the run knew first, then the new
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self.appends = [dict(a) for a in state.get("appends", [])]
        if new:
            n_known = int(sum(s.info.num_sequences for s in known))
            self.appends.append({"cursor": self.cursor, "known": n_known})
            self.appended = [s.name for s in new]
        self._order = self._epoch_order()
