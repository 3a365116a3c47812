"""Datasets (built-in PBMC sets, any .h5ad, TileDB-SOMA / Census), validation, the split and transforms.

``load_dataset(cfg)`` returns an in-memory AnnData [cells, genes] whose X holds
raw counts (or log-normalised values where ``cfg.preprocess.input_kind`` says so),
with every original obs column (SOMA: the columns asked for) plus ``obs["split"]`` in
{"train", "eval"} (by cell). ``open_dataset(cfg)`` gives the same cells without X for
SOMA sources, with a reader of rows on demand (``sae4scfm.data.stream``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae4scfm.errors import InputError

log = logging.getLogger(__name__)

BACKED_ABOVE_BYTES = 1 << 30  # open .h5ad files larger than 1 GiB backed (lazily)


def load_pbmc() -> ad.AnnData:
    """scanpy's bundled PBMC 68k subset: 700 cells x 765 genes, labels in ``bulk_labels``.

    The file stores log1p(CP10k) values in ``.raw``; the integer UMI counts are
    recovered exactly as ``expm1(raw) * n_counts / 1e4`` and returned in X.
    """
    import scanpy as sc

    bundled = sc.datasets.pbmc68k_reduced()
    logn = sp.csr_matrix(bundled.raw.X, dtype=np.float64)
    counts = logn.copy()
    counts.data = np.expm1(counts.data)
    counts = sp.diags(bundled.obs["n_counts"].to_numpy(np.float64) / 1e4) @ counts
    counts.data = np.round(counts.data)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    counts.eliminate_zeros()
    var = pd.DataFrame(index=bundled.raw.var_names.copy())
    return ad.AnnData(X=counts, obs=bundled.obs.copy(), var=var)


PBMC_BATCHES = ("pbmc68k_reduced", "pbmc3k")  # obs["batch"] values of data=pbmc_batches, in order


@functools.lru_cache(maxsize=1)
def _pbmc_batches() -> ad.AnnData:
    from sae4scfm.data.markers import annotate_by_markers, load_marker_sets
    from sae4scfm.data.pbmc3k import load_pbmc3k

    parts = {PBMC_BATCHES[0]: load_pbmc(), PBMC_BATCHES[1]: load_pbmc3k()}
    genes = parts[PBMC_BATCHES[0]].var_names.intersection(parts[PBMC_BATCHES[1]].var_names, sort=False)
    ensembl = parts[PBMC_BATCHES[1]].var.loc[genes, "ensembl_id"].to_numpy()
    adata = ad.concat([ad.AnnData(X=part[:, genes].X, obs=pd.DataFrame(index=part.obs_names.copy()))
                       for part in parts.values()],
                      label="batch", keys=list(parts), index_unique="-")
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.obs["batch"] = pd.Categorical(adata.obs["batch"], categories=list(parts))
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1), dtype=np.float32).ravel()
    adata.var_names = genes
    adata.var["gene_symbol"] = genes.to_numpy()
    adata.var["ensembl_id"] = ensembl
    annotate_by_markers(adata, load_marker_sets(), key_added="cell_type")
    adata.uns["cell_type"]["note"] += ("; one annotation of both batches together (same genes, "
                                       "normalisation, control genes and threshold)")
    adata.uns["batch"] = {
        PBMC_BATCHES[0]: "scanpy pbmc68k_reduced: 700 cells of 10x PBMC 68k (Zheng et al. 2017), "
                         "counts recovered from .raw",
        PBMC_BATCHES[1]: "10x PBMC 3k (2,700 cells, another donor and run) from the desc 2.1.1 wheel",
    }
    return adata


def load_pbmc_batches() -> ad.AnnData:
    """Two real PBMC experiments as two batches: pbmc68k_reduced (700 cells) + pbmc3k (2,700 cells).

    Different 10x experiments (donors, runs, depth), so a real batch effect. Returns
    an AnnData [3400 cells, 765 genes] with:

    - ``X``: integer UMI counts (CSR float32) over the genes both share (all 765 genes of
      pbmc68k_reduced, in its order; symbols as ``var_names``, ``var["ensembl_id"]`` from pbmc3k);
    - ``obs["batch"]``: source dataset (categorical, ``PBMC_BATCHES``); ``obs["n_counts"]``:
      UMIs per cell over these genes; obs_names ``<barcode>-<batch>``;
    - ``obs["cell_type"]``: labels from :func:`~sae4scfm.data.markers.annotate_by_markers`
      with the built-in marker sets, run once on all cells of both batches, so both batches
      are labelled by the same rule. DERIVED from marker genes, never ground truth:
      ``uns["cell_type"]`` records ``"derived": True``, the method and the markers present
      (no platelet marker is among the shared genes, so that set is skipped);
      ``obsm["cell_type_scores"]`` holds the per-set scores.

    Needs ``desc`` installed (see :func:`sae4scfm.data.pbmc3k.pbmc3k_path`). Built once per
    process; each call returns a fresh copy.
    """
    return _pbmc_batches().copy()


def sample_balanced(groups: np.ndarray, n_cells: int | None, seed: int) -> np.ndarray:
    """Sorted positions of ``n_cells`` cells, as even a share of each group as their sizes allow.

    Groups are filled smallest first: a group smaller than an even share of what is left is
    taken whole, the rest is split evenly over the larger ones (the largest takes the
    remainder of the division). All cells if None.
    """
    if n_cells is None or n_cells >= len(groups):
        return np.arange(len(groups))
    rng = np.random.default_rng(seed)
    names, sizes = np.unique(groups, return_counts=True)
    quota = np.zeros(len(names), dtype=np.int64)
    left = int(n_cells)
    for rank, g in enumerate(np.argsort(sizes, kind="stable")):
        quota[g] = min(sizes[g], left // (len(names) - rank))
        left -= quota[g]
    picked = [rng.choice(np.flatnonzero(groups == name), q, replace=False) for name, q in zip(names, quota)]
    return np.sort(np.concatenate(picked))


def load_h5ad(path: str | Path, n_cells: int | None, seed: int) -> ad.AnnData:
    """Any .h5ad file; opened backed (lazily) above 1 GiB so only the sampled cells are read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"data.path: file {path} does not exist; set data.path=/path/to/cells.h5ad.")
    backed = "r" if path.stat().st_size > BACKED_ABOVE_BYTES else None
    try:
        adata = ad.read_h5ad(path, backed=backed)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise InputError(f"data.path: {path} could not be read as .h5ad ({type(e).__name__}: {e}).") from e
    rows = sample_cells(adata.n_obs, n_cells, seed)
    adata = adata[rows].to_memory() if backed else adata[rows].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def sample_cells(n_obs: int, n_cells: int | None, seed: int) -> np.ndarray:
    """Sorted positions of ``n_cells`` cells drawn without replacement (all if None)."""
    if n_cells is None or n_cells >= n_obs:
        return np.arange(n_obs)
    return np.sort(np.random.default_rng(seed).choice(n_obs, int(n_cells), replace=False))


DATASETS = ("pbmc", "pbmc3k", "pbmc_batches", "kang", "h5ad", "soma", "census")  # data.name values


def load_dataset(cfg) -> ad.AnnData:
    """The dataset named by a ``data`` config group, subsampled and split by cell."""
    name, seed = cfg.name, int(cfg.get("seed", 0))
    if name == "pbmc":
        adata = load_pbmc()
    elif name == "pbmc3k":
        from sae4scfm.data.pbmc3k import load_pbmc3k

        adata = load_pbmc3k()
    elif name == "pbmc_batches":
        adata = load_pbmc_batches()
        adata = adata[sample_balanced(adata.obs["batch"].to_numpy(), cfg.get("n_cells"), seed)].copy()
    elif name == "kang":
        from sae4scfm.data.roma import load_kang

        adata = load_kang()
    elif name == "h5ad":
        if not cfg.get("path"):
            raise InputError("data.path is not set; run with data=h5ad data.path=/path/to/cells.h5ad.")
        adata = load_h5ad(cfg.path, cfg.get("n_cells"), seed)
    elif name in ("soma", "census"):
        from sae4scfm.data.soma import load_soma

        adata = load_soma(cfg)  # the filter and n_cells are applied while reading
    else:
        raise InputError(f"data.name={name!r} is unknown; use {', '.join(DATASETS)}.")
    if name in ("pbmc", "pbmc3k", "kang"):
        adata = adata[sample_cells(adata.n_obs, cfg.get("n_cells"), seed)].copy()
    return finish_dataset(adata, cfg)


def open_dataset(cfg):
    """(cells, reader) of a ``data`` config without holding the expression in memory where the source
    allows it: for ``data=soma``/``census`` and ``h5ad`` the AnnData holds obs and var only (X is None;
    the same cells and split as ``load_dataset``) and the reader (``sae4scfm.data.stream``) reads rows
    on demand; the built-in sets are loaded as ``load_dataset`` does and wrapped in ``InMemoryCells``."""
    from sae4scfm.data.stream import H5adReader, InMemoryCells, SomaReader

    if cfg.name == "h5ad" and cfg.get("path"):
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise InputError(f"data.path: file {path} does not exist; set data.path=/path/to/cells.h5ad.")
        try:
            backed = ad.read_h5ad(path, backed="r")  # obs and var only; X stays in the file
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
            raise InputError(f"data.path: {path} could not be read as .h5ad ({type(e).__name__}: {e}).") from e
        rows = sample_cells(backed.n_obs, cfg.get("n_cells"), int(cfg.get("seed", 0)))
        obs, var = backed.obs.iloc[rows].copy(), backed.var.copy()
        backed.file.close()
        adata = finish_dataset(ad.AnnData(obs=obs, var=var), cfg)
        return adata, H5adReader(str(path), rows, adata.obs, var)
    if cfg.name not in ("soma", "census"):
        adata = load_dataset(cfg)
        return adata, InMemoryCells(adata)
    from sae4scfm.data.soma import select_cells

    cells, obs, var = select_cells(cfg)
    cells.close()
    adata = finish_dataset(ad.AnnData(obs=obs, var=var), cfg)
    return adata, SomaReader(cells, adata.obs, var)


def finish_dataset(adata: ad.AnnData, cfg) -> ad.AnnData:
    """Unique obs_names, the configured obs keys checked, and ``obs["split"]`` (in place; returned)."""
    seed = int(cfg.get("seed", 0))
    make_obs_names_unique(adata, describe(cfg))
    for field in ("cell_type_key", "batch_key", "condition_key"):
        key = cfg.get(field)
        if key is not None:
            require_obs_column(adata, key, f"data.{field}", source=describe(cfg))
    adata.obs["split"] = split_cells(adata.n_obs, float(cfg.preprocess.split), seed)
    return adata


def make_obs_names_unique(adata: ad.AnnData, source: str) -> None:
    """Rename duplicate cell names in place (anndata's ``obs_names_make_unique``: the 2nd ``x``
    becomes ``x-1``, ...), with a logged note; every stage loads cells through here, so all see
    the same names."""
    dup = np.flatnonzero(adata.obs_names.duplicated())
    if len(dup):
        before = adata.obs_names[dup[:3]].tolist()
        adata.obs_names_make_unique()
        log.warning("%s: %d cells share their obs_name with an earlier cell (common in concatenated files); "
                    "renamed them as anndata's obs_names_make_unique does: %s", source, len(dup),
                    ", ".join(f"{a!r} -> {b!r}" for a, b in zip(before, adata.obs_names[dup[:3]])))


def describe(cfg) -> str:
    """The data source as errors and logs name it: the file, the SOMA URI or ``data=<name>``."""
    if cfg.name == "h5ad":
        return str(cfg.path)
    if cfg.name == "soma":
        return str(cfg.uri)
    return f"data={cfg.name}"


def split_cells(n_obs: int, eval_fraction: float, seed: int) -> pd.Categorical:
    """Split by cell: ``eval_fraction`` of cells (at least one) go to "eval", none in both."""
    if not 0 < eval_fraction < 1:
        raise InputError(f"data.preprocess.split={eval_fraction} must be a fraction in (0, 1).")
    n_eval = max(1, int(round(eval_fraction * n_obs)))
    labels = np.full(n_obs, "train", dtype=object)
    labels[np.random.default_rng(seed + 1).permutation(n_obs)[:n_eval]] = "eval"
    return pd.Categorical(labels, categories=["train", "eval"])


def require_obs_column(adata: ad.AnnData, key: str, field: str, source: str) -> pd.Series:
    """The obs column ``key``; a clear error naming ``field`` if it is absent or all-NaN."""
    if key not in adata.obs.columns:
        raise InputError(f"{field}={key!r}: {source} has no obs column {key!r}; "
                         f"available columns: {', '.join(map(str, adata.obs.columns))}.")
    column = adata.obs[key]
    if column.isna().all():
        raise InputError(f"{field}={key!r}: obs column {key!r} of {source} is empty (all NaN).")
    return column


class VocabMatrix(NamedTuple):
    matrix: sp.csr_matrix  # [cells, genes in vocab] float32
    genes: np.ndarray  # [genes in vocab] str


def select_vocab_genes(adata: ad.AnnData, vocab: dict, gene_key: str | None, source: str, *,
                       log_usage: bool = True) -> VocabMatrix:
    """Columns of ``adata.X`` whose gene (``var[gene_key]`` or var_names) is in ``vocab``; logs how many
    (``log_usage=False``: the caller logs it with ``log_gene_usage`` after a further subset)."""
    if gene_key is not None and gene_key not in adata.var.columns:
        raise InputError(f"data.gene_key={gene_key!r}: {source} has no var column {gene_key!r}; "
                         f"available: {', '.join(map(str, adata.var.columns)) or 'none'} "
                         "(use null for var_names).")
    genes = np.asarray(adata.var[gene_key] if gene_key else adata.var_names, dtype=str)
    in_vocab = np.fromiter((g in vocab for g in genes), dtype=bool, count=len(genes))
    if not in_vocab.any():
        where = f"var[{gene_key!r}]" if gene_key else "var_names"
        raise InputError(
            f"{source}: none of its {len(genes)} genes ({where}, e.g. {', '.join(genes[:3])}) is in "
            f"the model vocabulary (e.g. {', '.join(list(vocab)[:3])}). Set data.gene_key to the var "
            "column that holds identifiers of the kind the model uses (symbols or Ensembl IDs)."
        )
    if log_usage:
        log_gene_usage(source, int(in_vocab.sum()), len(genes))
    X = sp.csr_matrix(adata.X[:, np.flatnonzero(in_vocab)], dtype=np.float32)
    return VocabMatrix(X, genes[in_vocab])


def log_gene_usage(source: str, n_in_vocab: int, n_genes: int, n_hvg: int | None = None) -> None:
    """One log line: how many of the data's ``n_genes`` are in the model vocabulary, and, after an HVG
    subset, how many highly variable ones the model reads."""
    used = "" if n_hvg is None else f"; {n_hvg} highly variable used"
    log.info("%s: %d of %d genes are in the model vocabulary%s", source, n_in_vocab, n_genes, used)


def check_expression(X: sp.csr_matrix, input_kind: str, source: str) -> None:
    """NaN, infinite or negative values are errors; counts must be integers."""
    data = X.data
    if not np.isfinite(data).all():
        raise InputError(f"{source}: X contains NaN or infinite values; remove or fill them before running.")
    if (data < 0).any():
        raise InputError(f"{source}: X contains negative values (min {data.min():.3g}); expected "
                         f"{input_kind.replace('_', '-')} expression. Scaled/centred data cannot be used: "
                         "point at raw counts (e.g. adata.raw or a 'counts' layer).")
    if input_kind == "counts" and not np.allclose(data, np.round(data)):
        raise InputError(f"{source}: X has non-integer values but data.preprocess.input_kind=counts; "
                         "give raw counts, or set data.preprocess.input_kind=log_normalized.")


def normalise_expression(X: sp.csr_matrix, input_kind: str, normalize_total: float | None,
                         log1p: bool, source: str) -> sp.csr_matrix:
    """Validated copy of X [cells, genes]: counts -> per-cell total ``normalize_total`` -> log1p."""
    if input_kind not in ("counts", "log_normalized"):
        raise InputError(f"data.preprocess.input_kind={input_kind!r}: use counts or log_normalized.")
    check_expression(X, input_kind, source)
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    if input_kind == "log_normalized":
        return X
    if normalize_total:
        totals = np.asarray(X.sum(axis=1)).ravel()
        X = sp.csr_matrix(sp.diags(normalize_total / np.maximum(totals, 1e-12)) @ X, dtype=np.float32)
    if log1p:
        X.data = np.log1p(X.data)
    return X


def highly_variable(X_log: sp.csr_matrix, n_top: int) -> np.ndarray:
    """Bool mask [genes] of the ``n_top`` most dispersed genes (scanpy 'seurat' flavour, log data)."""
    import scanpy as sc

    if n_top >= X_log.shape[1]:
        return np.ones(X_log.shape[1], dtype=bool)
    tmp = ad.AnnData(X_log)
    sc.pp.highly_variable_genes(tmp, n_top_genes=int(n_top), flavor="seurat")
    return tmp.var["highly_variable"].to_numpy()
