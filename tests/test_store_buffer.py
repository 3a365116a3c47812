"""The prefetching buffer: seeking to a batch reads only the fills from the one that holds it and
gives exactly the batches an epoch from the start gives there; the background thread changes
nothing in the order and stops when the consumer stops."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from sae4scfm.store.buffer import ShufflingBuffer
from sae4scfm.store.shards import ActivationStore, _ShardWriter
from tests.test_training_parts import make_store


def test_seek_equals_the_epoch_from_the_start_and_reads_only_what_follows(tmp_path, monkeypatch):
    store = make_store(tmp_path, n=2000)
    buffer = ShufflingBuffer(store, 64, seed=5, buffer_tokens=300, chunk_tokens=20, prefetch=0)
    whole = list(buffer.epoch(2))
    sizes = [int((f[:, 2] - f[:, 1]).sum()) for f in buffer.fills(2)]  # rows per fill (~300)
    n_fills = len(sizes)
    assert n_fills >= 6 and len(whole) == 31
    for start in (0, 1, 4, 5, 17, 30, 31):  # some batches straddle two fills
        reads = []
        real_fill = ShufflingBuffer._fill
        monkeypatch.setattr(ShufflingBuffer, "_fill", lambda self, e, f, *a: reads.append(f) or real_fill(self, e, f, *a))
        got = list(buffer.epoch(2, start))
        monkeypatch.undo()
        assert len(got) == len(whole) - start
        assert all(torch.equal(a, b) for a, b in zip(got, whole[start:]))
        first = sum(1 for end in itertools.accumulate(sizes) if end <= start * 64)  # the fill holding row start*64
        assert reads == list(range(first, n_fills)), (start, reads)


def test_prefetch_thread_keeps_the_order_and_stops_with_the_consumer(tmp_path):
    store = make_store(tmp_path, n=2000)
    plain = list(ShufflingBuffer(store, 64, 5, 300, 20, prefetch=0).epoch(1))
    ahead = ShufflingBuffer(store, 64, 5, 300, 20, prefetch=2)
    assert all(torch.equal(a, b) for a, b in zip(list(ahead.epoch(1)), plain))
    before = threading.active_count()
    for _ in itertools.islice(ahead.epoch(1), 3):  # the consumer stops early (calibration does)
        pass
    assert threading.active_count() == before  # the reader thread was joined


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stores_read_through_the_memory_map(tmp_path, dtype):
    """The buffer's memory-mapped reads give the stored values (as float32) of every dtype."""
    g = torch.Generator().manual_seed(0)
    w = _ShardWriter(tmp_path / "s", layer=0, d_model=6, dtype=dtype, shard_tokens=50, include_special=False)
    zeros = torch.zeros(30, dtype=torch.long)
    for _ in range(5):
        w.add(torch.randn(30, 6, generator=g) * 3, zeros, zeros, zeros.bool())
    w.close(n_cells=1)
    store = ActivationStore(tmp_path / "s")
    stored = torch.cat([s["acts"] for s in store.iter_shards()]).float()
    got = torch.cat(list(ShufflingBuffer(store, 10, 0, 40, 7).epoch(0)))
    assert len(got) == 150 and got.dtype == torch.float32
    order = lambda t: t[torch.argsort(t[:, 0] * 1e4 + t[:, 1])]  # noqa: E731 - rows compared as a set
    assert torch.equal(order(got), order(stored))
