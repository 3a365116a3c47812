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


class LazyTokenizedCells:
    """Cells tokenized on demand, one chunk of ``chunk_cells`` cells at a time (the ``TokenizedCells`` API).

    ``reader`` yields the cells' expression (``reader.read(rows)`` -> AnnData [rows, genes]; ``len(reader)``
    cells); ``tokenize_chunk(chunk_adata, k)`` tokenizes chunk ``k`` (dataset rows ``k*chunk_cells`` ..).
    Chunks are fixed in dataset rows, so a cell's tokens never depend on which cells are asked for. Both
    must be picklable: the container pickles without its cache, so DataLoader workers (fork or spawn)
    read and tokenize on their own. ``rows`` [n] are this object's cells as dataset rows (= ``cell_index``).
    The last ``cache_chunks`` tokenized chunks are kept per process; ``lengths`` tokenizes every chunk
    once (one streaming pass) and keeps only the lengths [n] and gene-token counts.
    """

    def __init__(self, reader, tokenize_chunk, chunk_cells: int, rows: np.ndarray | None = None, *,
                 cache_chunks: int = 2, _shared: dict | None = None):
        self.reader = reader
        self.tokenize_chunk = tokenize_chunk
        self.chunk_cells = int(chunk_cells)
        self.rows = np.arange(len(reader), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.cache_chunks = int(cache_chunks)
        self._shared = {} if _shared is None else _shared  # per-row lengths / gene counts, shared by subsets
        self._cache: dict[int, TokenizedCells] = {}

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"LazyTokenizedCells({len(self)} cells, chunks of {self.chunk_cells})"

    @property
    def cell_index(self) -> np.ndarray:
        return self.rows

    def chunk(self, k: int) -> TokenizedCells:
        """Tokens of dataset chunk ``k`` (cells ``k*chunk_cells`` .. ``(k+1)*chunk_cells - 1``)."""
        if k not in self._cache:
            start = k * self.chunk_cells
            rows = np.arange(start, min(start + self.chunk_cells, len(self.reader)))
            tokens = self.tokenize_chunk(self.reader.read(rows), k)
            while len(self._cache) >= max(1, self.cache_chunks):
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = tokens
        return self._cache[k]

    def _first(self) -> TokenizedCells:
        return self.chunk(int(self.rows[0]) // self.chunk_cells if len(self) else 0)

    @property
    def pad_id(self) -> int:
        return self._first().pad_id

    @property
    def pad_value(self) -> float:
        return self._first().pad_value

    def _scan(self) -> dict:
        """Lengths [dataset cells] and gene tokens [dataset cells], from one pass over all chunks."""
        if "lengths" not in self._shared:
            n = len(self.reader)
            lengths, genes = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
            for k in range(-(-n // self.chunk_cells)):
                t, start = self.chunk(k), k * self.chunk_cells
                lengths[start:start + len(t)] = t.lengths
                genes[start:start + len(t)] = gene_tokens_per_cell(t)
            self._shared.update(lengths=lengths, gene_tokens=genes)
        return self._shared

    @property
    def lengths(self) -> np.ndarray:
        return self._scan()["lengths"][self.rows]

    @property
    def n_gene_tokens(self) -> int:
        return int(self._scan()["gene_tokens"][self.rows].sum())

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gene_ids, values, special) of the cell at position ``i``, as ``TokenizedCells.cell``."""
        k, local = divmod(int(self.rows[i]), self.chunk_cells)
        return self.chunk(k).cell(local)

    def subset(self, cells: np.ndarray) -> "LazyTokenizedCells":
        return LazyTokenizedCells(self.reader, self.tokenize_chunk, self.chunk_cells, self.rows[np.asarray(cells)],
                                  cache_chunks=self.cache_chunks, _shared=self._shared)

    def collate(self, cells: np.ndarray) -> Batch:
        """A padded batch of the cells at positions ``cells`` (in that order); ``cell_index`` = dataset rows.

        Reads and tokenizes each chunk the cells fall in (cells of one chunk together are cheapest)."""
        cells = np.asarray(cells, dtype=np.int64)
        chunk_of, local = np.divmod(self.rows[cells], self.chunk_cells)
        parts, order = [], []
        for k in np.unique(chunk_of):
            at = np.flatnonzero(chunk_of == k)
            tokens = self.chunk(int(k))
            parts.append(tokens.collate(local[at]))
            order.append(at)
        batch = parts[0] if len(parts) == 1 else _concat_batches(parts, tokens.pad_id, tokens.pad_value)
        inverse = np.empty(len(cells), dtype=np.int64)
        inverse[np.concatenate(order)] = np.arange(len(cells))
        idx = torch.from_numpy(inverse)
        return Batch(batch.gene_ids[idx], batch.values[idx], batch.padding_mask[idx], batch.gene_mask[idx],
                     torch.from_numpy(self.rows[cells]))

    def batches(self, batch_size: int, *, sort_by_length: bool = True) -> Iterator[Batch]:
        """Padded batches, chunk after chunk (each chunk tokenized once; a batch spans at most two
        chunks); with ``sort_by_length`` cells of similar length share a batch within a chunk."""
        chunk_of = self.rows // self.chunk_cells
        pending = np.zeros(0, dtype=np.int64)
        for k in np.unique(chunk_of):
            at = np.flatnonzero(chunk_of == k)
            if sort_by_length:
                at = at[np.argsort(self.chunk(int(k)).lengths[self.rows[at] % self.chunk_cells], kind="stable")]
            pending = np.concatenate([pending, at])
            while len(pending) >= batch_size:
                yield self.collate(pending[:batch_size])
                pending = pending[batch_size:]
        if len(pending):
            yield self.collate(pending)

    def truncate(self, max_len: int, rng: np.random.Generator) -> TokenizedCells:
        raise NotImplementedError("LazyTokenizedCells.truncate: materialise a small set with "
                                  "materialize() first (truncation redraws every cell's genes).")

    def materialize(self) -> TokenizedCells:
        """All of this object's cells as one in-memory ``TokenizedCells`` (small sets only)."""
        ids, vals, special = zip(*(self.cell(i) for i in range(len(self)))) if len(self) else ((), (), ())
        empty = np.zeros(0)
        return TokenizedCells(
            np.concatenate(ids or [empty]).astype(np.int64), np.concatenate(vals or [empty]).astype(np.float32),
            np.concatenate(special or [empty]).astype(bool),
            np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64),
            self.rows.copy(), self.pad_id, self.pad_value)


def _concat_batches(parts: list[Batch], pad_id: int, pad_value: float) -> Batch:
    """Batches stacked along the batch axis, right-padded to the longest (pad tokens as ``collate``)."""
    T = max(b.gene_ids.shape[1] for b in parts)

    def pad(t: torch.Tensor, fill) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill)

    return Batch(torch.cat([pad(b.gene_ids, pad_id) for b in parts]),
                 torch.cat([pad(b.values, pad_value) for b in parts]),
                 torch.cat([pad(b.padding_mask, True) for b in parts]),
                 torch.cat([pad(b.gene_mask, False) for b in parts]),
                 torch.cat([b.cell_index for b in parts]))


def gene_tokens_per_cell(tokens: TokenizedCells) -> np.ndarray:
    """[cells] int64: each cell's gene tokens (as counted by ``n_gene_tokens``)."""
    if type(tokens) is TokenizedCells:
        if not len(tokens):
            return np.zeros(0, dtype=np.int64)
        genes = np.add.reduceat(~tokens.special, tokens.offsets[:-1]).astype(np.int64)
        return np.where(tokens.lengths > 0, genes, 0)
    return np.array([tokens.subset(np.array([i])).n_gene_tokens for i in range(len(tokens))], dtype=np.int64)
