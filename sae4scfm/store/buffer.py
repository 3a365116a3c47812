"""The shuffling buffer that streams a store's activations into training as uniform batches.

Shards hold whole extraction batches of similar lengths (length tracks cell type and sequencing
depth), so mixing a few whole shards would give batches of few bands. Instead every epoch draws
*chunks* of ``chunk_tokens`` contiguous rows from all shards: a seeded permutation of all chunks
of the store is cut into *fills* of ``buffer_tokens // chunk_tokens`` chunks; each fill is read
(the ``acts`` tensor only, by preads: ``ActivationStore.read_rows``) straight into its shuffled row order, and the epoch's rows are the
fills one after the other, released as consecutive batches (a batch that straddles two fills takes the tail of one and
the head of the next). A batch is thus a uniform sample of the store's chunks, whatever the
on-disk order and the store size (the band fractions of a batch deviate from the store's by about
sqrt(p(1 − p) / chunks_per_fill); tests/test_store.py).

The order is a pure function of (seed, epoch): the chunk permutation draws from
``rng(seed, epoch)`` and fill f's row shuffle from ``rng(seed, epoch, f)``, so ``epoch(e, start)``
*seeks* to batch ``start`` by reading only the fills from the one that holds it (resume costs one
fill, not a replay of the epoch). Fills are read ``prefetch`` ahead in a background thread into
``prefetch + 1`` tensors used in turn, and each batch is released as its own copy (pinned memory
when CUDA is available, so the copy to the GPU can be asynchronous): memory stays at
``prefetch + 1`` fills whatever the store size. ``rank``/``world``: each rank gets its ``batch_size / world`` slice
of every global batch (DistributedDataParallel at the same global batch).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from sae4scfm.store.shards import ActivationStore


@dataclass
class ShufflingBuffer:
    """Shuffled float32 batches [batch_size // world, d_model] of ``store`` (this rank's slice of
    each global batch); each epoch covers every row once, the last partial batch dropped."""

    store: ActivationStore
    batch_size: int  # global batch (rows per optimizer step, all ranks together)
    seed: int
    buffer_tokens: int  # rows shuffled together in memory (one fill)
    chunk_tokens: int  # contiguous rows read from a shard at a time
    prefetch: int = 2  # fills read ahead in a background thread (0: read in the caller's thread)
    rank: int = 0
    world: int = 1

    def __len__(self) -> int:
        """Batches per epoch (the same for every epoch)."""
        return self.store.n_tokens // self.batch_size

    def chunks(self) -> np.ndarray:
        """[n_chunks, 3] int64 rows (shard, start, stop) tiling every shard."""
        rows = [(i, start, min(start + self.chunk_tokens, int(s["n_tokens"])))
                for i, s in enumerate(self.store.meta["shards"])
                for start in range(0, int(s["n_tokens"]), self.chunk_tokens)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)

    def fills(self, epoch: int) -> list[np.ndarray]:
        """The chunks of each fill of ``epoch``, in order."""
        chunks = self.chunks()
        chunks = chunks[np.random.default_rng([self.seed, epoch]).permutation(len(chunks))]
        per_fill = max(1, self.buffer_tokens // self.chunk_tokens)
        return [chunks[i:i + per_fill] for i in range(0, len(chunks), per_fill)]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Batches ``start``, ``start + 1``, ... of ``epoch`` (this rank's slice of each)."""
        if self.batch_size % self.world:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by the world size {self.world}")
        fills = self.fills(epoch)
        ends = np.cumsum([int((f[:, 2] - f[:, 1]).sum()) for f in fills])
        first = start * self.batch_size
        f0 = int(np.searchsorted(ends, first, side="right"))
        skip = first - (int(ends[f0 - 1]) if f0 else 0)  # rows of fill f0 before batch `start`
        part = self.batch_size // self.world
        lo, hi = self.rank * part, (self.rank + 1) * part
        carry = None
        for f, pool, release in self._read_ahead(epoch, fills, f0):
            if f == f0:
                pool = pool[skip:]
            if carry is not None:  # the batch straddling the previous fill and this one
                need = self.batch_size - len(carry)
                if len(pool) < need:
                    carry = torch.cat([carry, pool])
                    release()
                    continue
                yield self._copy(torch.cat([carry, pool[:need]])[lo:hi])
                pool = pool[need:]
            n_out = len(pool) // self.batch_size * self.batch_size
            for i in range(0, n_out, self.batch_size):
                yield self._copy(pool[i + lo:i + hi])
            carry = pool[n_out:].clone()
            release()  # the fill's tensor may now be refilled

    @staticmethod
    def _copy(rows: torch.Tensor) -> torch.Tensor:
        """A batch as its own tensor (pinned on CUDA), so the fill it came from can be refilled."""
        return rows.pin_memory() if torch.cuda.is_available() else rows.clone()

    def _read_ahead(self, epoch: int, fills: list[np.ndarray], first: int):
        """(f, fill f's shuffled rows, release) for f >= ``first``: fills are read into ``prefetch`` + 1
        tensors used in turn (one when ``prefetch`` is 0: read in the caller's thread), up to
        ``prefetch`` fills ahead in a background thread; ``release()`` hands a fill's tensor back for
        the next read, so memory is ``prefetch`` + 1 fills whatever the store size."""
        rows = max(int((c[:, 2] - c[:, 1]).sum()) for c in fills) if fills else 0
        slots: list[torch.Tensor | None] = [None] * (self.prefetch + 1)

        def read(f: int, slot: int) -> torch.Tensor:
            if slots[slot] is None:
                slots[slot] = torch.empty((rows, self.store.d_model), dtype=torch.float32)
            return self._fill(epoch, f, fills[f], slots[slot])

        if self.prefetch <= 0:
            for f in range(first, len(fills)):
                yield f, read(f, 0), lambda: None
            return
        ready: queue.Queue = queue.Queue()
        free: queue.Queue = queue.Queue()
        for slot in range(len(slots)):
            free.put(slot)
        stop = threading.Event()

        def produce():
            try:
                for f in range(first, len(fills)):
                    while not stop.is_set():
                        try:
                            slot = free.get(timeout=0.1)
                            break
                        except queue.Empty:
                            pass
                    if stop.is_set():
                        return
                    ready.put((f, read(f, slot), slot))
                ready.put(None)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                ready.put(e)

        thread = threading.Thread(target=produce, daemon=True, name="sae4scfm-buffer")
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                f, pool, slot = item
                yield f, pool, lambda slot=slot: free.put(slot)
        finally:
            stop.set()
            thread.join()

    def _fill(self, epoch: int, f: int, chunks: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Fill ``f``: the float32 rows [rows, d_model] of its chunks concatenated shard by shard
        (ascending shard, then the fill's chunk order), in the order of rng(seed, epoch, f)'s permutation
        (row i = concatenated row perm[i]), written into the first rows of ``out`` (default: a new tensor).

        Gathered straight into place: per shard one read of its chunks (``ActivationStore.read_rows``:
        preads, no memory map) scattered to their shuffled positions, so a fill costs one fill of memory
        (plus one shard's part of it), not a concatenation and a shuffled copy."""
        grouped = chunks[np.argsort(chunks[:, 0], kind="stable")]
        lengths = grouped[:, 2] - grouped[:, 1]
        n = int(lengths.sum())
        perm = np.random.default_rng([self.seed, epoch, f]).permutation(n)
        where = np.empty(n, dtype=np.int64)
        where[perm] = np.arange(n)  # concatenated row j goes to output row where[j]
        out = (torch.empty((n, self.store.d_model), dtype=torch.float32) if out is None else out)[:n]
        shards, first = np.unique(grouped[:, 0], return_index=True)
        edges = np.append(first, len(grouped))  # shard k: grouped chunks edges[k]:edges[k + 1]
        row_edges = np.concatenate([[0], np.cumsum(lengths)])[edges]  # ... and concatenated rows
        bf16, target = self.store.meta["dtype"] == "bfloat16", out.numpy()
        for k, shard in enumerate(shards):
            acts = self.store.read_rows(int(shard), grouped[edges[k]:edges[k + 1], 1:])
            if bf16:
                acts = torch.from_numpy(acts).view(torch.bfloat16).float().numpy()
            target[where[row_edges[k]:row_edges[k + 1]]] = acts  # numpy: one thread, no torch sync per shard
        return out
