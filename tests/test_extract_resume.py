"""Extraction killed by SIGKILL mid-run, then rerun: the finished shards are kept (not recomputed),
no half-written file is left under a final name, and the store is byte-identical to an
uninterrupted run's (float32 on CPU), also when the rerun collates in DataLoader workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sae4scfm.errors import InputError
from sae4scfm.store.extract import extraction_plan
from tests.conftest import REPO_ROOT

EXTRACT = """
import sys
import sae4scfm
from sae4scfm.scfm.loading import load_model_and_data, split_tokens
from sae4scfm.store.extract import extract_activations
cfg = sae4scfm.compose("train", ["data.n_cells=40", "data.preprocess.subset_hvg=true", "wandb.mode=disabled"])
adapter, adata, tokens = load_model_and_data(cfg, "cpu")
extract_activations(adapter, split_tokens(tokens, adata, "train"), [1, 2], sys.argv[1], batch_size=4,
                    shard_tokens=800, seed=3, num_workers=int(sys.argv[2]))
"""


def extract(out, workers=0, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", EXTRACT, str(out), str(workers)],
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sigkill_mid_extraction_then_rerun_equals_uninterrupted(tmp_path):
    ref = extract(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]
    n_shards = len(list((tmp_path / "ref" / "layer_1").glob("shard_*")))
    assert n_shards >= 4

    killed = extract(tmp_path / "run", SAE4SCFM_SLEEP_AFTER_SHARD="1")  # sleeps once shards 0 and 1 are written
    last = tmp_path / "run" / "layer_2.partial" / "shard_00001.safetensors"
    deadline = time.time() + 600
    while not last.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert killed.poll() is None, killed.stderr.read()[-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    partial = tmp_path / "run" / "layer_1.partial"
    assert not (tmp_path / "run" / "layer_1").exists()  # nothing looks finished
    assert sorted(p.name for p in partial.glob("shard_*")) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    (partial / ".shard_00002.safetensors.x.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves
    kept = {p: p.stat().st_mtime_ns for p in partial.glob("shard_*")}

    rerun = extract(tmp_path / "run", workers=2)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()[-2000:]
    store = tmp_path / "run" / "layer_1"
    assert all((store / p.name).stat().st_mtime_ns == t for p, t in kept.items())  # not recomputed
    assert files(tmp_path / "run") == files(tmp_path / "ref")  # byte-identical, meta.json included


def test_plan_buckets_lengths_and_shuffles_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=203)
    plan = extraction_plan(lengths, 8, 600, seed=1)
    batches = [b for shard in plan for b in shard]
    cells = np.concatenate(batches)
    assert sorted(cells.tolist()) == list(range(203))  # every cell once
    # similar lengths per batch: a batch spans a small part of the length range
    spans = [np.ptp(lengths[b]) for b in batches]
    assert np.median(spans) < 0.05 * np.ptp(lengths)
    # the batch order is shuffled (not by length), and a function of the seed
    means = [lengths[b].mean() for b in batches]
    assert not np.all(np.diff(means) >= 0)
    again = extraction_plan(lengths, 8, 600, seed=1)
    assert all(np.array_equal(a, b) for s, t in zip(plan, again) for a, b in zip(s, t))
    other = extraction_plan(lengths, 8, 600, seed=2)
    assert not all(np.array_equal(a, b) for s, t in zip(plan, other) for a, b in zip(s, t))
    # shards close once they hold >= shard_tokens rows (the last one may hold fewer)
    assert all(lengths[np.concatenate(s)].sum() >= 600 for s in plan[:-1])


def test_world_larger_than_cells_is_an_input_error(monkeypatch, tmp_path):
    from sae4scfm.scfm.tokens import TokenizedCells
    from sae4scfm.store import extract
    from sae4scfm.training import distributed

    monkeypatch.setattr(distributed, "ranks", lambda device="cpu": distributed.Ranks(0, 4, 0))

    class Adapter:
        device, d_model = "cpu", 4

    tokens = TokenizedCells(np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.float32), np.zeros(3, dtype=bool),
                            np.arange(4), np.arange(3), 0, 0.0)
    with pytest.raises(InputError, match="world size 4 exceeds the 3 cells"):
        extract.extract_activations(Adapter(), tokens, [0], tmp_path)


def test_a_store_with_missing_shards_is_not_finished(tmp_path):
    """Rank 0 lists the plan's shards in meta.json only when all are on disk (a rank on a node that
    does not share the store folder leaves gaps): one error line naming the fix."""
    import torch

    from sae4scfm.store.shards import _ShardWriter

    w = _ShardWriter(tmp_path / "layer_0.partial", 0, 2, "float32", 0, False, plan_id="p")
    for index in (0, 2):
        w.add(torch.ones(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
              torch.zeros(3, dtype=torch.bool))
        w.write(index)
    with pytest.raises(InputError, match=r"shards \[1\] are missing .* buffer.store_dir must be a folder all nodes share"):
        w.close(n_cells=6, n_shards=3)
    assert not (tmp_path / "layer_0.partial" / "meta.json").exists()
    again = _ShardWriter(tmp_path / "layer_0.partial", 0, 2, "float32", 0, False, plan_id="p")  # same plan: kept
    assert again.has(0) and again.has(2) and not again.has(1)
    other = _ShardWriter(tmp_path / "layer_0.partial", 0, 2, "float32", 0, False, plan_id="q")  # new plan: afresh
    assert not other.has(0)
