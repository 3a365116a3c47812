"""A training run killed mid-way resumes from its last checkpoint and ends where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import sae4scfm
from tests.conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[1]


def test_killed_run_resumes_to_same_weights(tmp_path):
    common = [*SMALL_RUN, "data.n_cells=300", "train.n_epochs=8", "train.checkpoint_every=20",
              "train.log_every=5", "experiment=resume", f"buffer.store_dir={tmp_path / 'stores'}"]
    reference = sae4scfm.train(sae4scfm.compose("train", [*common, f"runs_dir={tmp_path / 'ref'}"]))
    total = json.loads((reference / "cfg.json").read_text())["steps"]

    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train_sae.py"), *common,
                             f"runs_dir={tmp_path / 'killed'}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at, deadline = None, time.time() + 300
    while killed_at is None and proc.poll() is None and time.time() < deadline:
        for state in (tmp_path / "killed" / "resume").glob("*/checkpoint/state.json"):
            step = json.loads(state.read_text())["step"]
            if step >= 40:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert killed_at < total
    (run_dir,) = list((tmp_path / "killed" / "resume").glob("*"))
    assert not (run_dir / "sae.safetensors").exists()

    resumed = sae4scfm.train(sae4scfm.compose("train", [
        f"runs_dir={tmp_path / 'killed'}", "resume=true", "sae_checkpoint.experiment=resume",
        f"sae_checkpoint.timestamp={run_dir.name}"]))
    assert resumed == run_dir
    ref_w, got_w = load_file(reference / "sae.safetensors"), load_file(run_dir / "sae.safetensors")
    for name in ref_w:
        torch.testing.assert_close(got_w[name], ref_w[name], rtol=1e-5, atol=1e-6)
    ref_eval = json.loads((reference / "eval.json").read_text())
    got_eval = json.loads((run_dir / "eval.json").read_text())
    assert abs(ref_eval["fvu"] - got_eval["fvu"]) < 1e-5
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == total  # no duplicated rows after the restart
