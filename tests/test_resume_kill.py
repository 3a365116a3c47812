"""Training killed by SIGKILL (at whatever step it has reached after its first checkpoint, with
the prefetching buffer and the background checkpoint writer running) resumes bit-identically on
CPU: the resumed run seeks the buffer to its step and ends with the weights, Adam state, dead
counters and metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.test_resume import final_state

RUN = ["buffer.prefetch=2", "scfm=demo", "data=pbmc", "data.n_cells=60", "data.preprocess.split=0.2", "data.preprocess.subset_hvg=true",
       "wandb.mode=disabled", "seed=0", "sae=topk", "sae.target_layer=2", "sae.dictionary_multiplier=2",
       "sae.hyperparams.k=2", "sae.hyperparams.lr=1e-3", "train.n_epochs=4", "train.batch_size=512",
       "train.checkpoint_every=3", "train.log_every=1", "train.dead_after_tokens=1024", "train.eval_max_cells=2",
       "train.calibration_batches=2", "buffer.buffer_tokens=1024", "buffer.chunk_tokens=64",
       "experiment=kill"]


def train(*overrides) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "train_sae.py"), *overrides],
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkilled_training_resumes_bit_identically(tmp_path):
    stores = f"buffer.store_dir={tmp_path / 'stores'}"
    ref = train(*RUN, stores, f"runs_dir={tmp_path / 'ref'}")
    assert ref.wait(timeout=900) == 0, ref.stderr.read()[-2000:]
    (reference,) = (tmp_path / "ref" / "kill").iterdir()
    total = json.loads((reference / "cfg.json").read_text())["steps"]

    run = train(*RUN, stores, f"runs_dir={tmp_path / 'run'}")
    deadline = time.time() + 900
    while time.time() < deadline and run.poll() is None and not list((tmp_path / "run").glob("kill/*/checkpoint/state.json")):
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    (run_dir,) = (tmp_path / "run" / "kill").iterdir()
    killed_at = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
    assert 3 <= killed_at < total and not (run_dir / "sae.safetensors").exists()

    resumed = train(f"runs_dir={tmp_path / 'run'}", "resume=true", "sae_checkpoint.experiment=kill",
                    "sae_checkpoint.timestamp=latest")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-2000:]
    ref_state, got = final_state(reference), final_state(run_dir)
    assert ref_state.keys() == got.keys()
    assert not [k for k in ref_state if not torch.equal(ref_state[k], got[k])]
    assert (run_dir / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert load_file(run_dir / "sae.safetensors").keys() == load_file(reference / "sae.safetensors").keys()
