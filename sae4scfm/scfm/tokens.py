"""Model-independent token containers shared by every adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass
class Batch:
    """A padded batch of cells.

    gene_ids [B, T] long, values [B, T] float32, padding_mask [B, T] bool (True = pad),
    gene_mask [B, T] bool (True = a gene token; False for special tokens and padding),
    cell_index [B] long (row of the cell in the tokenized AnnData).
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    padding_mask: torch.Tensor
    gene_mask: torch.Tensor
    cell_index: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device) for t in (self.gene_ids, self.values, self.padding_mask,
                                               self.gene_mask, self.cell_index)))


@dataclass
class TokenizedCells:
    """Ragged token sequences of ``n_cells`` cells in CSR layout.

    Tokens of cell i are ``offsets[i]:offsets[i+1]`` of ``gene_ids`` (int64 vocab ids),
    ``values`` (float32 model input values) and ``special`` (bool, True for special
    tokens such as ``<cls>``). ``cell_index[i]`` is the cell's row in the AnnData.
    """

    gene_ids: np.ndarray
    values: np.ndarray
    special: np.ndarray
    offsets: np.ndarray
    cell_index: np.ndarray
    pad_id: int
    pad_value: float

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_gene_tokens(self) -> int:
        return int((~self.special).sum())

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens of the cell at position ``i``: (gene_ids [n] int64, values [n] float32, special [n] bool)."""
        sl = slice(self.offsets[i], self.offsets[i + 1])
        return self.gene_ids[sl], self.values[sl], self.special[sl]

    def subset(self, cells: np.ndarray) -> "TokenizedCells":
        """The cells at positions ``cells`` (positions in this object, not AnnData rows)."""
        pieces = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in cells]
        idx = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        lengths = self.lengths[cells]
        return TokenizedCells(
            self.gene_ids[idx], self.values[idx], self.special[idx],
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.cell_index[cells], self.pad_id, self.pad_value,
        )

    def truncate(self, max_len: int, rng: np.random.Generator) -> "TokenizedCells":
        """Each cell's special tokens plus a random subset of its gene tokens, ``max_len`` in all."""
        keep = np.zeros(len(self.gene_ids), dtype=bool)
        for i in range(len(self)):
            start, stop = self.offsets[i], self.offsets[i + 1]
            special = self.special[start:stop]
            genes = np.flatnonzero(~special)
            n_genes = max(0, max_len - int(special.sum()))
            chosen = genes if len(genes) <= n_genes else rng.choice(genes, n_genes, replace=False)
            keep[start + np.flatnonzero(special)] = True
            keep[start + chosen] = True
        lengths = np.add.reduceat(keep, self.offsets[:-1]) if len(self) else np.zeros(0, dtype=np.int64)
        return TokenizedCells(
            self.gene_ids[keep], self.values[keep], self.special[keep],
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.cell_index, self.pad_id, self.pad_value,
        )

    def batches(self, batch_size: int, *, sort_by_length: bool = True) -> Iterator[Batch]:
        """Padded batches; with ``sort_by_length`` cells of similar length share a batch."""
        order = np.argsort(self.lengths, kind="stable") if sort_by_length else np.arange(len(self))
        for start in range(0, len(order), batch_size):
            yield self.collate(order[start:start + batch_size])

    def collate(self, cells: np.ndarray) -> Batch:
        lengths = self.lengths[cells]
        B, T = len(cells), int(lengths.max())
        gene_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        values = np.full((B, T), self.pad_value, dtype=np.float32)
        special = np.ones((B, T), dtype=bool)
        for row, (i, n) in enumerate(zip(cells, lengths)):
            sl = slice(self.offsets[i], self.offsets[i + 1])
            gene_ids[row, :n] = self.gene_ids[sl]
            values[row, :n] = self.values[sl]
            special[row, :n] = self.special[sl]
        padding = np.arange(T)[None, :] >= lengths[:, None]
        return Batch(
            torch.from_numpy(gene_ids), torch.from_numpy(values), torch.from_numpy(padding),
            torch.from_numpy(~special & ~padding), torch.from_numpy(self.cell_index[cells].astype(np.int64)),
        )
