"""torchrun on CPU (gloo), with real ``torchrun --nproc_per_node=2`` subprocesses: a 2-process run
equals a 1-process run at the same global batch and seed (DistributedDataParallel: weights to
1e-4; the rank-sharded extraction: the same rows for every cell); a sweep spreads its members over
the ranks; a world larger than the number of cells is one error line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sae4scfm
from sae4scfm.store.buffer import ShufflingBuffer
from sae4scfm.store.shards import ActivationStore
from tests.conftest import REPO_ROOT
from tests.test_training_parts import make_store

SMALL = ["scfm=demo", "data=pbmc", "data.n_cells=60", "data.preprocess.split=0.2", "data.preprocess.subset_hvg=true",
         "wandb.mode=disabled", "seed=0", "sae=topk", "sae.target_layer=2", "sae.dictionary_multiplier=2",
         "sae.hyperparams.k=4", "sae.hyperparams.lr=1e-3", "train.n_epochs=1", "train.batch_size=512",
         "train.checkpoint_every=5", "train.log_every=1", "train.dead_after_tokens=1024", "train.eval_max_cells=2",
         "train.calibration_batches=2", "buffer.shard_tokens=2000", "experiment=dist"]


def torchrun(n: int, overrides: list[str], **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(REPO_ROOT / "scripts" / "train_sae.py"), *overrides]
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=900)


def rows_by_cell(store: ActivationStore) -> dict[tuple[int, int], torch.Tensor]:
    out = {}
    for shard in store.iter_shards():
        for a, c, g in zip(shard["acts"], shard["cell"].tolist(), shard["gene"].tolist()):
            out[(c, g)] = a
    return out


def test_rank_slices_make_up_the_global_batch(tmp_path):
    """Each rank's batches are its contiguous slice of the one-process batches: no row on two ranks."""
    store = make_store(tmp_path)
    whole = list(ShufflingBuffer(store, 64, 3, 300, 20).epoch(1))
    parts = [list(ShufflingBuffer(store, 64, 3, 300, 20, rank=r, world=2).epoch(1)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for w, a, b in zip(whole, *parts):
        assert len(a) == len(b) == 32
        assert torch.equal(torch.cat([a, b]), w)


def test_two_process_torchrun_equals_one_process(tmp_path):
    one = sae4scfm.train(sae4scfm.compose("train", [*SMALL, f"runs_dir={tmp_path / 'one'}",
                                                    f"buffer.store_dir={tmp_path / 'store1'}"]))
    done = torchrun(2, [*SMALL, f"runs_dir={tmp_path / 'two'}", f"buffer.store_dir={tmp_path / 'store2'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    (two,) = (tmp_path / "two" / "dist").iterdir()
    # extraction: both ranks wrote shards of one plan; every cell has the same rows as in one process
    (key1,), (key2,) = (tmp_path / "store1").iterdir(), (tmp_path / "store2").iterdir()
    for split in ("train", "eval"):
        s1, s2 = ActivationStore(key1 / split / "layer_2"), ActivationStore(key2 / split / "layer_2")
        assert s2.n_shards == s1.n_shards >= (2 if split == "train" else 1) and s2.n_tokens == s1.n_tokens
        r1, r2 = rows_by_cell(s1), rows_by_cell(s2)
        assert r1.keys() == r2.keys() and len(r1) == s1.n_tokens
        assert max(float((r1[k] - r2[k]).abs().max()) for k in r1) < 1e-5
    # training: DDP at the same global batch gives the same SAE and the same logged metrics
    w1, w2 = load_file(one / "sae.safetensors"), load_file(two / "sae.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-4, msg=k)
    m1 = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m1] == [r["step"] for r in m2] and len(m1) >= 5
    for a, b in zip(m1, m2):
        for k in ("loss", "mse", "fvu", "l0", "dead_fraction"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    assert any(r["dead_fraction"] > 0 for r in m1)  # dead latents: the all-reduced firing counters are in play


def test_sweep_members_and_layers_spread_over_ranks(tmp_path):
    """train.sweep x train.layers (4 SAEs) on 2 ranks: each rank trains two whole SAEs from the
    stores of one extraction pass; every SAE equals its one-process twin."""
    sweep = [*SMALL, "train.sweep={k:[2,4]}", "train.layers=[1,2]", "buffer.shard_tokens=100000"]
    one = sae4scfm.train(sae4scfm.compose("train", [*sweep, f"runs_dir={tmp_path / 'one'}",
                                                    f"buffer.store_dir={tmp_path / 'store'}"]))
    done = torchrun(2, [*sweep, f"runs_dir={tmp_path / 'two'}", f"buffer.store_dir={tmp_path / 'store'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    suffix = lambda p: p.name.split("-", 3)[-1]  # noqa: E731 - Dec01-21-37-k2-layer1 -> k2-layer1
    one, two = sorted(one, key=suffix), sorted((tmp_path / "two" / "dist").iterdir(), key=suffix)
    assert [suffix(p) for p in one] == [suffix(p) for p in two] == ["k2-layer1", "k2-layer2", "k4-layer1",
                                                                    "k4-layer2"]
    for a, b in zip(one, two):
        cfg = json.loads((b / "cfg.json").read_text())
        assert (cfg["layer"], cfg["hyperparams"]["k"]) == (int(suffix(b)[-1]), int(suffix(b)[1])), cfg
        w1, w2 = load_file(a / "sae.safetensors"), load_file(b / "sae.safetensors")
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-4, msg=f"{b.name}: {k}")
    layers = {p.name for p in (next((tmp_path / "store").iterdir()) / "train").iterdir()}
    assert layers == {"layer_1", "layer_2"}


def test_world_larger_than_the_cells_is_one_error_line(tmp_path):
    done = torchrun(2, ["scfm=demo", "data=pbmc", "data.n_cells=3", "data.preprocess.split=0.34",
                        "wandb.mode=disabled", "sae=topk", "sae.target_layer=2", "train.batch_size=2",
                        "sae.hyperparams.k=2", f"runs_dir={tmp_path / 'runs'}", f"buffer.store_dir={tmp_path / 's'}"])
    assert done.returncode != 0
    errors = [line for line in done.stdout.splitlines() + done.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(re.search(r"world size 2 exceeds the 1 cells", e) for e in errors), done.stderr[-2000:]
    assert np.unique(errors).size == 1


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=1001"], "train.batch_size=1001 is not divisible by the torchrun world size 2"),
    (["sae=p_anneal"], "sae=p_anneal resamples latents from the batch"),
])
def test_data_parallel_rejects_what_ranks_cannot_share(overrides, message):
    from sae4scfm.errors import InputError
    from sae4scfm.training.distributed import Ranks
    from sae4scfm.training.trainer import _check_data_parallel

    cfg = sae4scfm.compose("train", overrides)
    with pytest.raises(InputError, match=message):
        _check_data_parallel(cfg, Ranks(0, 2, 0))
    _check_data_parallel(sae4scfm.compose("train", []), Ranks(0, 2, 0))  # the defaults pass


def test_train_layers_members_and_bad_values():
    from sae4scfm.errors import InputError
    from sae4scfm.training.trainer import sweep_configs

    members = sweep_configs(sae4scfm.compose("train", ["train.layers=[0,3]", "train.sweep={k:[8,16]}"]))
    assert [(s, int(c.sae.target_layer), int(c.sae.hyperparams.k)) for s, c in members] == [
        ("-k8-layer0", 0, 8), ("-k16-layer0", 0, 16), ("-k8-layer3", 3, 8), ("-k16-layer3", 3, 16)]
    assert all(c.train.layers is None and c.train.sweep is None for _, c in members)
    for bad in ("train.layers=[]", "train.layers=2", "train.layers=[a]"):
        with pytest.raises(InputError, match="train.layers=.* must be a non-empty list of layer numbers"):
            sweep_configs(sae4scfm.compose("train", [bad]))
