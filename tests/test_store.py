"""Training batches are uniform samples of the store's cells, whatever the on-disk order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae4scfm.store.buffer import ShufflingBuffer
from sae4scfm.store.shards import ActivationStore, _ShardWriter

SHARD, BATCH, BUFFER, CHUNK = 2048, 256, 4096, 8  # the defaults' shard:buffer ratio (1:2)


def banded_store(tmp_path, n_bands: int) -> ActivationStore:
    """Shard i holds only cells of band i (as a length-ordered extraction writes them);
    every activation's first coordinate is its band."""
    w = _ShardWriter(tmp_path / "store", layer=0, d_model=4, dtype="float32", shard_tokens=SHARD,
                     include_special=False)
    for band in range(n_bands):
        for cell in range(SHARD // 64):  # 64-token cells
            zeros = torch.zeros(64, dtype=torch.long)
            w.add(torch.full((64, 4), float(band)), zeros + band * 1000 + cell, zeros, zeros.bool())
    w.close(n_cells=n_bands * SHARD // 64)
    store = ActivationStore(tmp_path / "store")
    assert store.n_shards == n_bands
    return store


@pytest.mark.parametrize("n_bands", [4, 16])
def test_batch_composition_matches_the_store(tmp_path, n_bands):
    """Each batch holds every band at the store's fraction p = 1/n_bands, within 6 standard
    deviations of a batch of BATCH tokens from BUFFER/CHUNK random chunks,
    sd = sqrt(p(1 − p)(CHUNK/BUFFER + 1/BATCH)) (measured: 0.87–0.96 sd; the largest of 10^4
    deviations 4.4 sd, the count of a rare band being skewed). Mixing about two whole shards, as
    the buffer did before, gives batches of one or two bands: largest deviations 0.32 (4 bands,
    bound 0.20) and 0.51 (16 bands, bound 0.11)."""
    store = banded_store(tmp_path, n_bands)
    buffer = ShufflingBuffer(store, BATCH, seed=0, buffer_tokens=BUFFER, chunk_tokens=CHUNK)
    p = 1 / n_bands
    bound = 6 * np.sqrt(p * (1 - p) * (CHUNK / BUFFER + 1 / BATCH))
    for epoch in (0, 1):
        batches = list(buffer.epoch(epoch))
        assert len(batches) == store.n_tokens // BATCH
        fractions = np.stack([np.bincount(x[:, 0].long().numpy(), minlength=n_bands) / BATCH for x in batches])
        assert np.abs(fractions - p).max() < bound, (np.abs(fractions - p).max(), bound)
        assert (fractions > 0).all()  # no batch misses a band


def test_epoch_order_is_a_function_of_seed_and_epoch(tmp_path):
    store = banded_store(tmp_path, 4)

    def order(seed, epoch):
        return torch.cat(list(ShufflingBuffer(store, BATCH, seed, BUFFER, CHUNK).epoch(epoch)))

    assert torch.equal(order(0, 1), order(0, 1))
    assert not torch.equal(order(0, 1), order(0, 0)) and not torch.equal(order(0, 1), order(1, 1))
