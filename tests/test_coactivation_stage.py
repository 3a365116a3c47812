"""The analyze stage's co-activation step (sae4scfm.analysis.analyze.run_coactivation) on a synthetic run."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from omegaconf import OmegaConf

from sae4scfm.analysis.analyze import run_coactivation
from sae4scfm.analysis.coactivation import significant_pairs
from sae4scfm.analysis.run_data import RunData, read_table
from sae4scfm.errors import InputError

A = {"coactivation_rows": "cells", "coactivation_min_count": 5, "max_fdr": 0.05, "leiden_resolution": 1.0,
     "auroc_threshold": 0.9}


def _run(tmp_path, X) -> RunData:
    features = ad.AnnData(sp.csr_matrix(X.astype(np.float32)), obs=pd.DataFrame(index=[f"c{i}" for i in range(len(X))]))
    cfg = OmegaConf.create({"seed": 0, "data": {"cell_type_key": None}})
    (tmp_path / "analysis").mkdir()
    return RunData(tmp_path, tmp_path / "analysis", cfg, {"d_sae": X.shape[1]}, features, None)


def test_cells_are_the_default_rows_and_planted_pairs_form_a_module(tmp_path):
    rng = np.random.default_rng(0)
    X = (rng.random((300, 8)) < 0.2).astype(float)
    X[:, 1] = X[:, 0]
    X[:, 2] = X[:, 0]
    run = _run(tmp_path, X)
    out = run_coactivation(run, OmegaConf.create(A))
    pairs = pd.read_csv(run.out_dir / "coactivation_pairs.csv")
    ref = significant_pairs(sp.csr_matrix(X), min_count=5, max_fdr=0.05)  # on the cells' features.h5ad X
    pd.testing.assert_frame_equal(pairs[["i", "j", "count"]], ref[["i", "j", "count"]])
    assert {(0, 1), (0, 2), (1, 2)} <= set(zip(pairs["i"], pairs["j"]))
    assert out.loc[0, "module"] == out.loc[1, "module"] == out.loc[2, "module"] >= 0
    with pytest.raises(InputError, match="features.token_features=true"):  # tokens asked for but not written
        run_coactivation(run, OmegaConf.create({**A, "coactivation_rows": "tokens"}))
    with pytest.raises(InputError, match="coactivation_rows='genes'"):
        run_coactivation(run, OmegaConf.create({**A, "coactivation_rows": "genes"}))


def test_no_significant_pair_writes_an_empty_modules_table_with_its_columns(tmp_path):
    """Before: modules.csv was written without a header when no module formed, and summary.md crashed reading it."""
    rng = np.random.default_rng(1)
    run = _run(tmp_path, (rng.random((40, 6)) < 0.3).astype(float))  # independent features: no significant pair
    out = run_coactivation(run, OmegaConf.create(A))
    assert (out["module"] == -1).all() and (out["n_partners"] == 0).all()
    modules = read_table(run, "modules.csv")
    assert len(modules) == 0 and list(modules.columns) == ["module", "size", "features"]
