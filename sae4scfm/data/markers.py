"""Marker-gene sets and a deterministic marker-based cell-type annotation.

Labels produced here are *derived* from marker genes: a convenience for inspecting
features, never ground truth.
"""

from __future__ import annotations

import json
import logging
import warnings
from importlib import resources
from typing import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

log = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
SELF_WEIGHT = 0.3  # share of a cell's own score in the kNN-smoothed score
METHOD = (
    "scanpy.tl.score_genes (random_state=0, ctrl_size=50, n_bins=25) per marker set on "
    "normalize_total(target_sum=1e4)+log1p of raw counts; if smooth_neighbors > 1, "
    f"score = {SELF_WEIGHT}*own + {1 - SELF_WEIGHT:.1f}*mean over the cell's smooth_neighbors "
    "nearest cells (itself included; exact Euclidean kNN on 30 PCs of 2000 seurat-flavour HVGs, "
    "PCA random_state=0); label = argmax set, 'unassigned' where the best score < min_score"
)


def load_marker_sets() -> dict[str, list[str]]:
    """Built-in curated human PBMC/immune marker sets: ``{cell_type: [gene symbols]}``.

    Read from ``sae4scfm/resources/cell_type_markers.json``; keys starting with ``_``
    (metadata such as ``_source``) are skipped.
    """
    text = resources.files("sae4scfm").joinpath("resources", "cell_type_markers.json").read_text("utf-8")
    return {k: list(v) for k, v in json.loads(text).items() if not k.startswith("_")}


def annotate_by_markers(
    adata: ad.AnnData,
    markers: Mapping[str, Sequence[str]],
    *,
    key_added: str = "cell_type_derived",
    min_score: float = 0.1,
    layer: str | None = None,
    smooth_neighbors: int | None = 15,
) -> None:
    """Label each cell with its best-scoring marker set, in place. Deterministic.

    Raw UMI counts (``adata.X``, or ``adata.layers[layer]``; n_obs x n_vars, genes
    matched to markers by ``var_names``) are copied, normalized to 1e4 counts per cell
    and log1p-transformed; ``adata``'s matrices are never modified. Each set is scored
    with ``sc.tl.score_genes`` (mean log1p expression of the markers minus that of
    expression-matched random control genes, ``random_state=0``).

    Single 10x cells detect few markers, so unless ``smooth_neighbors`` is None or <= 1
    each score becomes ``0.3 * own + 0.7 * mean over the smooth_neighbors nearest cells``
    (itself included; exact kNN in a 30-PC PCA of 2000 highly variable genes). Keeping
    part of the own score lets very rare types (a handful of pDCs) survive smoothing.
    Each cell gets the set with the highest score, or ``"unassigned"`` where that score
    is below ``min_score`` (log1p units).

    Markers absent from ``var_names`` are ignored; a set with none present is skipped
    with a logged warning; ``ValueError`` if no set has any marker present.

    Writes ``adata.obs[key_added]`` (categorical: set names + "unassigned"),
    ``adata.obsm[key_added + "_scores"]`` (DataFrame n_obs x n_sets) and
    ``adata.uns[key_added] = {"derived": True, "method", "note", "min_score",
    "smooth_neighbors", "markers_used": {set: [genes present]}}``.
    """
    counts = adata.X if layer is None else adata.layers[layer]
    counts = sp.csr_matrix(counts, dtype=np.float32, copy=True) if sp.issparse(counts) else np.array(counts, dtype=np.float32)
    work = ad.AnnData(X=counts, obs=pd.DataFrame(index=adata.obs_names.copy()),
                      var=pd.DataFrame(index=adata.var_names.copy()))
    work.var_names_make_unique()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)

    present = set(work.var_names)
    used: dict[str, list[str]] = {}
    scores: dict[str, np.ndarray] = {}
    for name, genes in markers.items():
        genes = [g for g in dict.fromkeys(genes) if g in present]
        if not genes:
            log.warning("marker set %r: none of its genes is in var_names; set skipped", name)
            continue
        sc.tl.score_genes(work, genes, score_name="_score", random_state=0, use_raw=False)
        used[name] = genes
        scores[name] = work.obs["_score"].to_numpy(dtype=np.float64)
    if not scores:
        raise ValueError("annotate_by_markers: no marker set has any gene present in adata.var_names")

    table = np.column_stack(list(scores.values()))
    if smooth_neighbors is not None and smooth_neighbors > 1:
        table = SELF_WEIGHT * table + (1 - SELF_WEIGHT) * (_knn_mean(work, int(smooth_neighbors)) @ table)
    names = np.array(list(scores), dtype=object)
    labels = names[table.argmax(axis=1)]
    labels[table.max(axis=1) < min_score] = UNASSIGNED
    adata.obs[key_added] = pd.Categorical(labels, categories=[*scores, UNASSIGNED])
    adata.obsm[f"{key_added}_scores"] = pd.DataFrame(table, index=adata.obs_names, columns=list(scores))
    adata.uns[key_added] = {
        "derived": True,
        "method": METHOD,
        "note": "derived from marker genes, not ground truth",
        "min_score": float(min_score),
        "smooth_neighbors": 0 if smooth_neighbors is None else int(smooth_neighbors),
        "markers_used": used,
    }


def _knn_mean(work: ad.AnnData, k: int) -> sp.csr_matrix:
    """Row-stochastic n_obs x n_obs matrix: mean over each cell's k nearest cells (itself included).

    ``work`` holds log1p-normalized expression; exact Euclidean kNN on a PCA (<= 30 PCs)
    of <= 2000 highly variable genes, so the result is deterministic.
    """
    from sklearn.neighbors import NearestNeighbors

    n_obs, n_vars = work.shape
    k = min(k, n_obs)
    with warnings.catch_warnings():  # tiny inputs: "n_top_genes > number of dispersions"
        warnings.filterwarnings("ignore", message=".*n_top_genes.*", category=UserWarning)
        sc.pp.highly_variable_genes(work, n_top_genes=min(2000, n_vars), flavor="seurat")
    x = work.X[:, work.var["highly_variable"].to_numpy()]
    n_comps = max(1, min(30, n_obs - 1, x.shape[1] - 1))
    pcs = sc.pp.pca(x, n_comps=n_comps, random_state=0)
    idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(pcs).kneighbors(pcs, return_distance=False)
    rows = np.repeat(np.arange(n_obs), k)
    return sp.csr_matrix((np.full(n_obs * k, 1.0 / k), (rows, idx.ravel())), shape=(n_obs, n_obs))
