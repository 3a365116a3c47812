"""The shuffling buffer that streams a store's activations into training as uniform batches.

Extraction writes cells in length order (similar lengths share a forward), so a shard holds
one band of cells (length tracks cell type and sequencing depth) and mixing a few whole shards
gives batches of one band. Instead every epoch draws *chunks* of ``chunk_tokens`` contiguous
tokens from all shards: a seeded permutation of all chunks of the store is read
``buffer_tokens // chunk_tokens`` chunks at a time, and each fill is shuffled token by token and
released as batches. A batch is thus a uniform sample of the store's chunks, whatever the
on-disk order and the store size (the band fractions of a batch deviate from the store's by
about sqrt(p(1 − p) / chunks_per_fill); tests/test_store.py), memory stays at about two fills,
and the order is a pure function of (seed, epoch), so resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open

from sae4scfm.store.shards import ActivationStore


@dataclass
class ShufflingBuffer:
    """Shuffled float32 batches [batch_size, d_model] of ``store``; each epoch covers every token
    once, the last partial batch dropped."""

    store: ActivationStore
    batch_size: int
    seed: int
    buffer_tokens: int  # tokens shuffled together in memory
    chunk_tokens: int  # contiguous tokens read from a shard at a time

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        return self.store.n_tokens // self.batch_size

    def chunks(self) -> np.ndarray:
        """[n_chunks, 3] int64 rows (shard, start, stop) tiling every shard."""
        rows = [(i, start, min(start + self.chunk_tokens, int(s["n_tokens"])))
                for i, s in enumerate(self.store.meta["shards"])
                for start in range(0, int(s["n_tokens"]), self.chunk_tokens)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng([self.seed, epoch])
        chunks = self.chunks()
        chunks = chunks[rng.permutation(len(chunks))]
        per_fill = max(1, self.buffer_tokens // self.chunk_tokens)
        carry = torch.empty(0, self.store.d_model)
        for first in range(0, len(chunks), per_fill):
            pool = torch.cat([carry, self._read(chunks[first:first + per_fill])])
            pool = pool[torch.from_numpy(rng.permutation(len(pool)))]
            n_out = len(pool) // self.batch_size * self.batch_size
            yield from pool[:n_out].split(self.batch_size)
            carry = pool[n_out:]

    def _read(self, chunks: np.ndarray) -> torch.Tensor:
        """The float32 activations of ``chunks`` (rows of ``chunks()``), each shard opened once."""
        out = []
        for shard in np.unique(chunks[:, 0]):
            with safe_open(self.store.root / self.store.meta["shards"][shard]["file"], framework="pt") as f:
                acts = f.get_slice("acts")
                out += [acts[int(a):int(b)].float() for a, b in chunks[chunks[:, 0] == shard, 1:]]
        return torch.cat(out)
