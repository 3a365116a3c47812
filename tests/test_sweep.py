"""Several SAEs trained on the same batches in one pass equal the same SAEs trained alone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import sae4scfm
from sae4scfm.errors import InputError
from tests.conftest import SMALL_RUN


def test_sweep_in_one_pass_equals_separate_runs(tmp_path):
    common = [*SMALL_RUN, "data.n_cells=200", "train.n_epochs=1", f"runs_dir={tmp_path}",
              f"buffer.store_dir={tmp_path / 'stores'}"]
    swept = sae4scfm.train(sae4scfm.compose("train", [*common, "experiment=sweep", "train.sweep={k:[4,8]}"]))
    assert [p.name.split("-")[-1] for p in swept] == ["k4", "k8"]
    for run_dir, k in zip(swept, (4, 8)):
        alone = sae4scfm.train(sae4scfm.compose("train", [*common, f"experiment=alone{k}", f"sae.hyperparams.k={k}"]))
        got, ref = load_file(run_dir / "sae.safetensors"), load_file(alone / "sae.safetensors")
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)
        assert (run_dir / "config.yaml").read_text().count(f"k: {k}") == 1


def test_sweep_over_unknown_key_is_an_error(tmp_path):
    with pytest.raises(InputError, match="train.sweep: l1_coeff not in sae.hyperparams"):
        sae4scfm.train(sae4scfm.compose("train", [*SMALL_RUN, f"runs_dir={tmp_path}", "train.sweep={l1_coeff:[1,2]}"]))


def test_hydra_multirun_sweep(tmp_path):
    """`-m sae.hyperparams.k=4,8` runs one job per value, each a finished run dir."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_sae.py"
    proc = subprocess.run([sys.executable, str(script), "-m", *SMALL_RUN, "data.n_cells=200", "train.n_epochs=1",
                           "sae.hyperparams.k=4,8", "experiment=multirun", f"runs_dir={tmp_path}",
                           f"buffer.store_dir={tmp_path / 'stores'}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ks = sorted(json.loads(p.read_text())["hyperparams"]["k"] for p in (tmp_path / "multirun").glob("*/cfg.json"))
    assert ks == [4, 8]
