"""A training run interrupted right after a known step resumes from its last checkpoint and ends
bit-identical (weights, Adam state, dead-latent counters, metrics) to an uninterrupted run, for
every architecture with state beyond its weights. Runs on CPU, where kernels are deterministic;
on CUDA a resumed run is close, not bitwise equal (``training.checkpoint``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sae4scfm
import sae4scfm.training.trainer as trainer
from sae4scfm.errors import InputError

KILL_AFTER, CHECKPOINT_EVERY = 5, 2  # the last checkpoint before the kill is step 4
# what each architecture keeps beyond its weights, made to change within the few steps of the run
ARCHITECTURES = {
    # AuxK over dead latents (dead after one batch without firing)
    "topk": ["sae.hyperparams.k=2", "sae.hyperparams.lr=1e-3"],
    "batchtopk": ["sae.hyperparams.k=2", "sae.hyperparams.lr=1e-3", "sae.hyperparams.threshold_momentum=0.5"],
    "matryoshka": ["sae.hyperparams.k=2", "sae.hyperparams.lr=1e-3", "sae.hyperparams.threshold_momentum=0.5"],
    # p, λ and resampling of the latents a strong penalty kills
    "p_anneal": ["sae.hyperparams.lr=5e-2", "sae.hyperparams.l1_coeff=1000", "sae.hyperparams.resample_every=3",
                 "sae.hyperparams.n_p_updates=8"],
    "gated": ["sae.hyperparams.lr=1e-3"],  # r_mag, b_mag and the sparsity warm-up
    "gated_anneal": ["sae.hyperparams.lr=5e-2", "sae.hyperparams.l1_coeff=1000", "sae.hyperparams.resample_every=3",
                     "sae.hyperparams.n_p_updates=8"],
}


def overrides(tmp_path, arch: str) -> list[str]:
    return ["scfm=demo", "data=pbmc", "data.n_cells=60", "data.preprocess.split=0.2",
            "data.preprocess.subset_hvg=true", "wandb.mode=disabled", "seed=0", f"sae={arch}",
            "sae.target_layer=2", "sae.dictionary_multiplier=2", *ARCHITECTURES[arch],
            "train.n_epochs=2", "train.batch_size=1024", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "train.log_every=1", "train.dead_after_tokens=1024", "train.eval_max_cells=2",
            "train.calibration_batches=2", f"buffer.store_dir={tmp_path.parent / 'stores'}",
            f"experiment={arch}"]


class Killed(Exception):
    pass


def final_state(run_dir) -> dict[str, torch.Tensor]:
    (state,) = (run_dir / "checkpoint").glob("state-*.safetensors")
    return {**load_file(state), **{f"final.{k}": v for k, v in load_file(run_dir / "sae.safetensors").items()}}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_interrupted_run_resumes_bit_identically(tmp_path, monkeypatch, arch):
    reference = sae4scfm.train(sae4scfm.compose("train", [*overrides(tmp_path, arch), f"runs_dir={tmp_path / 'ref'}"]))
    total = json.loads((reference / "cfg.json").read_text())["steps"]
    assert total > 2 * KILL_AFTER

    step_once = trainer.train_step

    def step_then_die(m, x, step, *args):  # the process dies right after step KILL_AFTER
        row = step_once(m, x, step, *args)
        if step == KILL_AFTER:
            raise Killed
        return row

    monkeypatch.setattr(trainer, "train_step", step_then_die)
    with pytest.raises(Killed):
        sae4scfm.train(sae4scfm.compose("train", [*overrides(tmp_path, arch), f"runs_dir={tmp_path / 'run'}"]))
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "run" / arch).iterdir()
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not (run_dir / "sae.safetensors").exists()
    at_kill = load_file(run_dir / "checkpoint" / "state-00000004.safetensors")
    with (run_dir / "metrics.jsonl").open("a") as f:  # killed while writing the row of step 6
        f.write('{"step": 6, "epoch": 0, "lo')

    resumed = sae4scfm.train(sae4scfm.compose("train", [
        f"runs_dir={tmp_path / 'run'}", "resume=true", f"sae_checkpoint.experiment={arch}",
        "sae_checkpoint.timestamp=latest"]))
    assert resumed == run_dir
    ref, got = final_state(reference), final_state(run_dir)
    assert ref.keys() == got.keys() and any(k.startswith("opt.") for k in ref) and "since_fired" in ref
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"{arch}: differ after resume: {differ}"
    assert (run_dir / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    # the state beyond the weights was in play after the resume point, so the test could fail
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    if arch in ("topk", "batchtopk", "matryoshka"):  # dead latents, so AuxK and the dead counters act
        assert any(r["dead_fraction"] > 0 for r in rows if r["step"] > 4)
    if arch in ("p_anneal", "gated_anneal"):  # latents resampled after the checkpoint it resumed from
        assert int(ref["sae.n_resampled"]) > int(at_kill["sae.n_resampled"])


def test_resume_latest_without_checkpoint_is_an_error(tmp_path):
    (tmp_path / "runs" / "exp" / "Jan01-00-00").mkdir(parents=True)  # a run dir killed before its first checkpoint
    with pytest.raises(InputError, match=r"timestamp=latest: no run of sae_checkpoint.experiment='exp'.*has a checkpoint"):
        sae4scfm.train(sae4scfm.compose("train", [f"runs_dir={tmp_path / 'runs'}", "resume=true",
                                                  "sae_checkpoint.experiment=exp", "sae_checkpoint.timestamp=latest"]))
