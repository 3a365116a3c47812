"""Bad input gets one clear error that names the problem and the fix, never a deep traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import sae4scfm
from sae4scfm.data import load_pbmc
from sae4scfm.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def write_h5ad(path: Path, *, genes=None, value=None, n=40) -> Path:
    pbmc = load_pbmc()[:n]
    X = pbmc.X.toarray()
    if value is not None:
        X[3, 5] = value
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=pbmc.obs.copy(),
                       var=pbmc.var.copy() if genes is None else None)
    if genes is not None:
        adata.var_names = genes
    adata.write_h5ad(path)
    return path


def train_cfg(tmp_path, *overrides):
    return sae4scfm.compose("train", ["wandb.mode=disabled", f"runs_dir={tmp_path / 'runs'}",
                                      f"buffer.store_dir={tmp_path / 'stores'}", *overrides])


def test_missing_file_cli(tmp_path):
    """From the command line: exit status 2, one line naming the field and file, no traceback; the
    data file is checked before any model is loaded, so an empty cache builds no demo first."""
    missing, cache = tmp_path / "nope.h5ad", tmp_path / "empty_cache"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_sae.py"), "data=h5ad",
                           f"data.path={missing}", "wandb.mode=disabled", f"runs_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "SAE4SCFM_CACHE": str(cache)})
    assert proc.returncode == 2
    assert "error: data.path" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cache / "demo_scgpt").exists()


def test_no_genes_in_vocab(tmp_path):
    path = write_h5ad(tmp_path / "x.h5ad", genes=[f"ENSG{i:011d}" for i in range(765)])
    with pytest.raises(InputError, match=r"none of its 765 genes .*model vocabulary.*data.gene_key"):
        sae4scfm.train(train_cfg(tmp_path, "data=h5ad", f"data.path={path}"))


def test_unknown_label_column(tmp_path):
    with pytest.raises(InputError, match=r"data.cell_type_key='celltype'.*available columns: bulk_labels"):
        sae4scfm.train(train_cfg(tmp_path, "data.cell_type_key=celltype"))


@pytest.mark.parametrize("value, message", [(np.nan, "NaN"), (-1.0, "negative values")])
def test_bad_expression_values(tmp_path, value, message):
    path = write_h5ad(tmp_path / "x.h5ad", value=value)
    with pytest.raises(InputError, match=message) as err:
        sae4scfm.train(train_cfg(tmp_path, "data=h5ad", f"data.path={path}"))
    assert str(path) in str(err.value)


def test_non_integer_counts(tmp_path):
    path = write_h5ad(tmp_path / "x.h5ad", value=0.5)
    with pytest.raises(InputError, match="non-integer values.*input_kind=log_normalized"):
        sae4scfm.train(train_cfg(tmp_path, "data=h5ad", f"data.path={path}"))


def test_layer_out_of_range(tmp_path):
    with pytest.raises(InputError, match=r"sae.target_layer=9 is out of range.*0 \(embeddings\) to 4"):
        sae4scfm.train(train_cfg(tmp_path, "sae.target_layer=9"))
    assert not list((tmp_path / "runs").glob("*/*"))  # a rejected run leaves no run dir behind


def test_latest_is_the_last_trained_run(tmp_path):
    """Later stages write into run dirs; "latest" still means the run that finished training last."""
    import os
    import time

    from sae4scfm.runs import resolve_run_dir

    exp = tmp_path / "runs" / "exp"
    for i, name in enumerate(["Jan01-00-00", "Jan02-00-00"]):
        (exp / name).mkdir(parents=True)
        (exp / name / "cfg.json").write_text("{}")
        os.utime(exp / name / "cfg.json", (time.time() - 100 + i, time.time() - 100 + i))
    (exp / "Jan01-00-00" / "features").mkdir()  # the older run gets new files afterwards
    assert resolve_run_dir(tmp_path / "runs", "exp", "latest").name == "Jan02-00-00"


def test_unknown_experiment_and_timestamp(tmp_path):
    (tmp_path / "runs" / "exists" / "Jan01-00-00").mkdir(parents=True)
    (tmp_path / "runs" / "exists" / "Jan01-00-00" / "cfg.json").write_text("{}")
    with pytest.raises(InputError, match=r"experiment='nope'.*known: exists"):
        sae4scfm.generate_features(sae4scfm.compose("features", [
            f"runs_dir={tmp_path / 'runs'}", "sae_checkpoint.experiment=nope", "sae_checkpoint.timestamp=latest"]))
    with pytest.raises(InputError, match=r"timestamp='Feb02-00-00'.*Jan01-00-00"):
        sae4scfm.analyze_features(sae4scfm.compose("analyze", [
            f"runs_dir={tmp_path / 'runs'}", "sae_checkpoint.experiment=exists", "sae_checkpoint.timestamp=Feb02-00-00"]))


def test_scalar_sweep_cli(tmp_path):
    """`train.sweep={k:8}` (a value, not a list) is one error line before anything is loaded."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_sae.py"), "train.sweep={k:8}",
                           "wandb.mode=disabled", f"runs_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: train.sweep: k=8 must be a non-empty list of values, e.g. 'train.sweep={k:[8]}'" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_too_few_training_tokens_leave_no_run_dir(tmp_path):
    with pytest.raises(InputError, match=r"train.batch_size=1024 exceeds the \d+ training tokens; lower it or raise "
                                         r"data.n_cells"):
        sae4scfm.train(train_cfg(tmp_path, "data.n_cells=3"))
    assert not list((tmp_path / "runs").glob("*/*"))


def test_empty_eval_split_is_an_error_before_any_run_dir(tmp_path):
    """Eval cells without a single gene token (here: no counts) would end the run in a division by
    zero after training; the split is checked before anything is written."""
    from sae4scfm.data import split_cells

    pbmc = load_pbmc()[:40]
    X = pbmc.X.toarray()
    X[np.asarray(split_cells(40, 0.2, seed=0)) == "eval"] = 0  # the eval cells of data.seed=0
    path = tmp_path / "x.h5ad"
    ad.AnnData(X=sp.csr_matrix(X), obs=pbmc.obs.copy(), var=pbmc.var.copy()).write_h5ad(path)
    with pytest.raises(InputError, match=r"the eval split is empty \(8 cells, no tokens.*raise data.n_cells or "
                                         r"data.preprocess.split"):
        sae4scfm.train(train_cfg(tmp_path, "data=h5ad", f"data.path={path}", "seed=0", "train.batch_size=64"))
    assert not list((tmp_path / "runs").glob("*/*"))


def test_metrics_log_drops_a_half_written_last_line_only(tmp_path):
    """Resume keeps the rows up to the checkpoint, drops a last line cut off by a kill, and names a
    corrupt line anywhere else."""
    from omegaconf import OmegaConf

    from sae4scfm.training.trainer import MetricsLog

    cfg = OmegaConf.create({"wandb": {"mode": "disabled"}})
    rows = "".join(f'{{"step": {s}}}\n' for s in range(1, 6))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 6, "lo')
    MetricsLog(tmp_path, cfg, resume_step=4).close()
    assert (tmp_path / "metrics.jsonl").read_text() == rows.rsplit('{"step": 5}', 1)[0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl: line 2 is not JSON; fix or delete that line"):
        MetricsLog(tmp_path, cfg, resume_step=4)
