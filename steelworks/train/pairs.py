"""Tokenized preference pairs on disk, and the loader that feeds them to the DPO loop.

``dpo/pairs/pairs.parquet`` holds one row per pair: ``pair_id``, ``source`` (file:line),
``chosen_ids``/``chosen_mask``, ``rejected_ids``/``rejected_mask`` (the mask marks the answer
tokens, ``data/preference.encode_answer``), and ``ref_chosen``/``ref_rejected``, the frozen
reference model's summed log-probabilities of each answer (``train/reference.py``). The
file is written once, atomically, after the reference pass, so a crash leaves either no
pairs or complete ones.

``PairLoader`` has the interface of ``PackedLoader`` (``next_step``, ``steps_per_epoch``,
``epoch``, exact ``state_dict``) over pairs instead of packed rows: each epoch is a seeded
permutation of the pairs, a step takes the next ``world * micro_batch * grad_accum`` of
them, and rank r takes its contiguous share. Preference sets are small next to
pretraining corpora (UltraFeedback: 60k pairs, ~0.5 GB of token ids), so the table is held
in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PAIRS_FILE = "pairs.parquet"
COLUMNS = ("pair_id", "source", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


@dataclass
class PairBatch:
    """``B`` pairs as ``2B`` right-padded rows: the chosen answers first, then the rejected."""

    input_ids: torch.Tensor  # [2B, L]
    answer_mask: torch.Tensor  # [2B, L], 1 on answer tokens
    ref_chosen: torch.Tensor | None  # [B] reference log-probs (None in the reference pass)
    ref_rejected: torch.Tensor | None

    @property
    def num_pairs(self) -> int:
        return self.input_ids.size(0) // 2

    @property
    def answer_lengths(self) -> torch.Tensor:
        return self.answer_mask.sum(dim=1)


def collate(chosen_ids: list[np.ndarray], chosen_mask: list[np.ndarray], rejected_ids: list[np.ndarray],
            rejected_mask: list[np.ndarray], pad_id: int, ref: tuple[np.ndarray, np.ndarray] | None = None
            ) -> PairBatch:
    """Pad the pairs' sequences to their longest (right padding: a causal model's outputs at
    real positions never see the padding after them)."""
    ids, masks = list(chosen_ids) + list(rejected_ids), list(chosen_mask) + list(rejected_mask)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(ids), width), dtype=torch.uint8)
    for i, (x, m) in enumerate(zip(ids, masks, strict=True)):
        input_ids[i, : len(x)] = torch.from_numpy(np.array(x, dtype=np.int64))  # a copy: x may be read-only
        answer_mask[i, : len(m)] = torch.from_numpy(np.array(m, dtype=np.uint8))
    refs = (None, None) if ref is None else tuple(torch.as_tensor(np.asarray(r, dtype=np.float64)) for r in ref)
    return PairBatch(input_ids, answer_mask, *refs)


def read_pairs(directory: str | Path) -> dict[str, Any]:
    """The pairs table as numpy columns (lists of arrays for the token columns)."""
    import pyarrow.parquet as pq

    path = Path(directory) / PAIRS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenized preference pairs (the dpo stage writes them)")
    table = pq.read_table(path)
    missing = [c for c in (*COLUMNS, "ref_chosen", "ref_rejected") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; was the reference pass run?")
    cols: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        if name.endswith(("_ids", "_mask")):
            # Flat values + offsets -> one numpy view per row, without a Python list per token.
            flat = col.combine_chunks()
            values = flat.values.to_numpy(zero_copy_only=False)
            offsets = flat.offsets.to_numpy()
            cols[name] = [values[offsets[i]: offsets[i + 1]] for i in range(len(flat))]
        else:
            cols[name] = col.to_numpy(zero_copy_only=False)
    return cols


class PairLoader:
    """Deterministic, exactly resumable batches of pairs (module docstring)."""

    def __init__(self, directory: str | Path, rank: int, world: int, micro_batch: int,
                 grad_accum: int, seed: int, pad_id: int, max_length: int) -> None:
        from steelworks.core.atomic import sha256_file

        self.dir = Path(directory)
        self.rank, self.world, self.micro, self.accum, self.seed = rank, world, micro_batch, grad_accum, seed
        self.pad_id, self.seq_len = pad_id, max_length
        self.cols = read_pairs(self.dir)
        self.sha256 = sha256_file(self.dir / PAIRS_FILE)
        self.epoch, self.cursor = 0, 0
        self.appended: list[str] = []  # PackedLoader's interface; pairs are not appended
        if self.global_batch > len(self):
            raise ValueError(f"{self.dir}: {len(self)} preference pairs < one global batch of "
                             f"{self.global_batch} (micro_batch_size x grad_accum x workers); "
                             "lower the batch or add pairs")

    def __len__(self) -> int:
        return len(self.cols["pair_id"])

    @property
    def global_batch(self) -> int:
        return self.world * self.micro * self.accum

    @property
    def steps_per_epoch(self) -> int:
        return len(self) // self.global_batch  # the remainder waits for the next epoch's order

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self))

    def next_step(self) -> list[PairBatch]:
        """This rank's micro batches for the next optimizer step."""
        if self.cursor + self.global_batch > len(self):
            self.epoch, self.cursor = self.epoch + 1, 0
        order = self._order()[self.cursor: self.cursor + self.global_batch]
        self.cursor += self.global_batch
        share = order[self.rank * self.micro * self.accum: (self.rank + 1) * self.micro * self.accum]
        c = self.cols
        out = []
        for k in range(self.accum):
            idx = share[k * self.micro: (k + 1) * self.micro]
            out.append(collate([c["chosen_ids"][i] for i in idx], [c["chosen_mask"][i] for i in idx],
                               [c["rejected_ids"][i] for i in idx], [c["rejected_mask"][i] for i in idx],
                               self.pad_id, (c["ref_chosen"][idx], c["ref_rejected"][idx])))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "pairs", "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor,
                "pairs": len(self), "sha256": self.sha256}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "pairs":
            raise ValueError("the checkpoint's loader state is not a DPO pair loader's")
        if state["sha256"] != self.sha256 or state["pairs"] != len(self):
            raise ValueError(f"{self.dir / PAIRS_FILE} changed since the checkpoint was made "
                             f"({state['pairs']} -> {len(self)} pairs): DPO cannot resume on "
                             "other pairs; restart the stage")
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's seed {state['seed']} differs from {self.seed}")
        # The cursor counts pairs, so a different world or batch split resumes at the same pair.
        self.epoch, self.cursor = state["epoch"], state["cursor"]
