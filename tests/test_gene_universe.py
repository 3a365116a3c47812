"""The gene universe of gene scores and enrichment is the genes the model saw (sae4scfm.analysis.run_data)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from omegaconf import OmegaConf

from sae4scfm.analysis.run_data import RunData
from sae4scfm.errors import InputError

GENES = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "PPBP"]


def _run(tmp_path, with_tokens: bool) -> RunData:
    """A run on 4 cells x 6 genes whose tokens saw only CD3E, LYZ and PPBP (e.g. the vocabulary / HVG subset)."""
    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(3.0, (4, len(GENES))).astype(np.float32)),
                       var=pd.DataFrame(index=GENES))
    features = ad.AnnData(sp.csr_matrix(rng.random((4, 3)).astype(np.float32)), obs=adata.obs.copy())
    tokens = None
    if with_tokens:
        seen = ["CD3E", "LYZ", "PPBP", "LYZ"]
        tokens = ad.AnnData(sp.csr_matrix(rng.random((4, 3)).astype(np.float32)),
                            obs=pd.DataFrame({"cell_index": [0, 1, 2, 3], "gene": seen, "gene_name": seen},
                                             index=[f"t{i}" for i in range(4)]))
    cfg = OmegaConf.create({"data": {"gene_key": None, "preprocess": {"input_kind": "counts"}}})
    run = RunData(tmp_path, tmp_path / "analysis", cfg, {"d_sae": 3}, features, tokens)
    run.cache["adata"] = adata  # the run's dataset, as load_dataset would give it
    return run


def test_universe_is_the_genes_the_tokens_saw(tmp_path):
    run = _run(tmp_path, with_tokens=True)
    assert run.universe() == ["CD3E", "LYZ", "PPBP"]  # dataset order, each gene once
    expr, genes = run.expression()
    assert expr.shape == (4, 3) and genes == run.universe()


def test_universe_without_token_features_is_an_error_not_every_gene(tmp_path):
    """Before: every gene of the dataset (6 here, incl. genes the model never saw) became the background."""
    run = _run(tmp_path, with_tokens=False)
    with pytest.raises(InputError) as e:
        run.universe()
    msg = str(e.value)
    assert "token_features.h5ad" in msg and str(tmp_path) in msg and "features.token_features=true" in msg


def test_universe_recorded_in_features_needs_no_token_file(tmp_path):
    """generate_features records the genes the model read (also for cell-level SAEs, which write no token file)."""
    run = _run(tmp_path, with_tokens=False)
    run.features.uns["sae4scfm"] = {"genes_seen": ["PPBP", "CD3E"]}
    assert run.universe() == ["CD3E", "PPBP"]  # dataset order
