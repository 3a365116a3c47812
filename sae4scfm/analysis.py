"""Feature interpretation: exact sparse label AUROC and the per-run results table.

AUROC is the Mann-Whitney U statistic with average ranks for ties,
``U / (n_pos * n_neg)``, i.e. exactly ``sklearn.metrics.roc_auc_score``.
It is computed for all features at once from one sort of the explicit entries.

Results table: one per run, index ``feature_id`` (int), columns
``(analysis, metric)`` with string names, stored as ``results.parquet`` and
``results.csv`` (header rows ``analysis`` and ``metric``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .runs import make_shareable

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
COLUMN_LEVELS = ["analysis", "metric"]
INDEX_NAME = "feature_id"


# --------------------------------------------------------------------------- AUROC


def _as_csc(X) -> sp.csc_matrix:
    """Canonical float64 CSC copy [n_cells, n_features] without explicit zeros."""
    if sp.issparse(X):
        X = sp.csc_matrix(X, dtype=np.float64, copy=True)
    else:
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2:
            raise InputError(f"feature matrix must be 2-D [n_cells, n_features], got shape {arr.shape}")
        X = sp.csc_matrix(arr)
    X.sum_duplicates()
    X.eliminate_zeros()
    if not np.isfinite(X.data).all():
        raise InputError(
            "feature matrix contains NaN or infinite values; AUROC needs finite scores. "
            "Fix or drop those features/cells before the analysis."
        )
    return X


def _shifted_ranks(X: sp.csc_matrix) -> tuple[sp.csc_matrix, np.ndarray]:
    """Average ranks (1-based, within each column) of a canonical CSC matrix.

    Returns ``(S, zero_rank)``: ``zero_rank`` [n_features] is the tied rank of
    the (implicit) zeros of each column, and ``S`` [n_cells, n_features] has
    the same sparsity as ``X`` with data ``rank - zero_rank[col]``, so the full
    rank matrix is ``S + zero_rank`` (broadcast over rows).
    """
    n, m = X.shape
    nnz_per_col = np.diff(X.indptr)
    col = np.repeat(np.arange(m, dtype=np.int32 if m < 2**31 else np.int64), nnz_per_col)
    # Sort by column, then value: value sort, then a stable integer sort by column
    # (about 2x faster than np.lexsort; order within tied values is irrelevant).
    order = np.argsort(X.data)
    order = order[np.argsort(col[order], kind="stable")]
    vals = X.data[order]
    scol = col[order]
    pos = np.arange(X.nnz) - X.indptr[scol]  # 0-based position within column
    start = np.ones(X.nnz, dtype=bool)
    if X.nnz:
        start[1:] = (scol[1:] != scol[:-1]) | (vals[1:] != vals[:-1])
    end = np.ones(X.nnz, dtype=bool)
    end[:-1] = start[1:]
    group = np.cumsum(start) - 1
    avg = (pos[start] + pos[end]) / 2.0 + 1.0  # average rank among explicit entries
    rank_explicit = avg[group]

    n_zero = n - nnz_per_col
    n_negative = np.bincount(col[X.data < 0], minlength=m)
    zero_rank = n_negative + (n_zero + 1) / 2.0
    # Positive values rank after all zeros of their column.
    rank = rank_explicit + np.where(vals > 0, n_zero[scol], 0)
    data = np.empty(X.nnz, dtype=np.float64)
    data[order] = rank - zero_rank[scol]
    S = sp.csc_matrix((data, X.indices.copy(), X.indptr.copy()), shape=(n, m))
    return S, zero_rank.astype(np.float64)


def _auroc_from_onehot(S: sp.csc_matrix, zero_rank: np.ndarray, onehot: sp.csc_matrix) -> np.ndarray:
    """One-vs-rest AUROC [n_values, n_features] from ranks and a 0/1 matrix [n_cells, n_values]."""
    n = S.shape[0]
    n_pos = np.asarray(onehot.sum(axis=0), dtype=np.float64).ravel()
    n_neg = n - n_pos
    rank_sum = np.asarray((onehot.T @ S).todense(), dtype=np.float64)
    rank_sum += n_pos[:, None] * zero_rank[None, :]
    u = rank_sum - (n_pos * (n_pos + 1) / 2.0)[:, None]
    return u / (n_pos * n_neg)[:, None]


def auroc_sparse(X, y) -> np.ndarray:
    """AUROC of each feature for a binary label.

    X: sparse (any format) or dense [n_cells, n_features]; y: bool (or 0/1) [n_cells].
    Returns float64 [n_features], equal to ``roc_auc_score(y, X[:, j])`` per column.
    """
    X = _as_csc(X)
    y = np.asarray(y).ravel()
    if y.shape[0] != X.shape[0]:
        raise InputError(f"label vector has {y.shape[0]} entries but the feature matrix has {X.shape[0]} cells")
    if y.dtype != bool:
        if not np.isin(y, [0, 1]).all():
            raise InputError("binary labels must be boolean or 0/1; map the label to True/False first")
        y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        raise InputError(
            f"AUROC needs both classes but the label has only one ({n_pos} positive of {y.shape[0]} cells); "
            "choose a label with positive and negative cells"
        )
    S, zero_rank = _shifted_ranks(X)
    onehot = sp.csc_matrix(y.astype(np.float64)[:, None])
    return _auroc_from_onehot(S, zero_rank, onehot)[0]


def label_auroc(X, labels, *, min_cells: int = 1) -> pd.DataFrame:
    """One-vs-rest AUROC of every feature for every label value.

    X: sparse or dense [n_cells, n_features]; labels: Series/array [n_cells]
    (NaN cells are dropped from both sides). Values with fewer than
    ``min_cells`` cells are skipped (their cells still count as "rest").
    Returns DataFrame [n_features, n_kept_values], index ``feature_id``,
    columns = label values (categorical order if categorical, else sorted).
    """
    X = _as_csc(X)
    lab = labels.reset_index(drop=True) if isinstance(labels, pd.Series) else pd.Series(np.asarray(labels))
    if len(lab) != X.shape[0]:
        raise InputError(f"labels have {len(lab)} entries but the feature matrix has {X.shape[0]} cells")
    valid = lab.notna().to_numpy()
    try:  # categorical: observed categories in category order
        codes, uniques = pd.factorize(lab[valid], sort=True)
    except TypeError:  # unorderable values
        codes, uniques = pd.factorize(lab[valid], sort=False)
    if len(uniques) < 2:
        raise InputError(
            f"one-vs-rest AUROC needs at least 2 distinct label values, found {len(uniques)} "
            "among non-missing cells; choose a label with several values"
        )
    n_valid = len(codes)
    counts = np.bincount(codes, minlength=len(uniques))
    keep = np.flatnonzero(counts >= min_cells)
    index = pd.RangeIndex(X.shape[1], name=INDEX_NAME)
    if keep.size == 0:
        return pd.DataFrame(index=index, columns=pd.Index([], dtype=object), dtype=np.float64)
    remap = np.full(len(uniques), -1)
    remap[keep] = np.arange(keep.size)
    kc = remap[codes]
    rows = np.flatnonzero(kc >= 0)
    onehot = sp.csc_matrix(
        (np.ones(rows.size), (rows, kc[rows])), shape=(n_valid, keep.size), dtype=np.float64
    )
    S, zero_rank = _shifted_ranks(X if valid.all() else X[np.flatnonzero(valid)].tocsc())
    auc = _auroc_from_onehot(S, zero_rank, onehot)
    return pd.DataFrame(auc.T, index=index, columns=pd.Index([uniques[k] for k in keep], dtype=object))


def label_scoring(features_X, obs: pd.DataFrame, label_keys: list[str], *, min_cells: int = 10) -> pd.DataFrame:
    """Label AUROC table for several ``obs`` columns.

    features_X: [n_cells, n_features]; obs: [n_cells, ...] aligned by position.
    Per key: ``auroc:{key}={value}`` (one-vs-rest, values with >= min_cells cells),
    ``best:{key}`` (str, value of max AUROC) and ``best_auroc:{key}``.
    Returns DataFrame [n_features, ...] with index ``feature_id`` 0..n_features-1.
    """
    X = _as_csc(features_X)
    if len(obs) != X.shape[0]:
        raise InputError(
            f"obs has {len(obs)} rows but the feature matrix has {X.shape[0]} cells; "
            "use the obs of the same dataset the features were extracted from"
        )
    parts = []
    for key in label_keys:
        if key not in obs.columns:
            raise InputError(
                f"label column {key!r} not found in obs; available columns: "
                f"{', '.join(map(str, obs.columns)) or '(none)'}. Fix the label key in the config."
            )
        col = obs[key].reset_index(drop=True)
        if col.isna().all():
            raise InputError(f"label column {key!r} in obs is entirely missing (NaN); choose another label key")
        n_distinct = col.dropna().nunique()
        if n_distinct < 2:
            raise InputError(
                f"label column {key!r} in obs has {n_distinct} distinct value; "
                "AUROC needs at least 2, choose another label key"
            )
        auc = label_auroc(X, col, min_cells=min_cells)
        if auc.shape[1] == 0:
            raise InputError(
                f"no value of label column {key!r} has at least min_cells={min_cells} cells; "
                "lower min_cells or choose another label key"
            )
        values = [str(v) for v in auc.columns]
        arr = auc.to_numpy()
        best = np.argmax(arr, axis=1)
        part = pd.DataFrame(arr, index=auc.index, columns=[f"auroc:{key}={v}" for v in values])
        part[f"best:{key}"] = np.asarray(values, dtype=object)[best]
        part[f"best_auroc:{key}"] = arr[np.arange(arr.shape[0]), best]
        parts.append(part)
    if not parts:
        return pd.DataFrame(index=pd.RangeIndex(X.shape[1], name=INDEX_NAME))
    out = pd.concat(parts, axis=1)
    out.index = pd.RangeIndex(X.shape[1], name=INDEX_NAME)
    return out


# --------------------------------------------------------------------------- results table


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        make_shareable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    df.columns = df.columns.set_names(COLUMN_LEVELS)
    df.index.name = INDEX_NAME
    return df


def read_results(out_dir) -> pd.DataFrame:
    """Read the run's results table [n_features, (analysis, metric)] (parquet if present, else CSV)."""
    out_dir = Path(out_dir)
    pq, csv = out_dir / RESULTS_PARQUET, out_dir / RESULTS_CSV
    if pq.exists():
        df = pd.read_parquet(pq)
    elif csv.exists():
        df = pd.read_csv(csv, header=[0, 1], index_col=0, float_precision="round_trip")
    else:
        raise InputError(
            f"no results table in {out_dir} (expected {RESULTS_PARQUET} or {RESULTS_CSV}); "
            "run an analysis on this run directory first"
        )
    return _normalise(df)


def update_results(out_dir, analysis: str, table: pd.DataFrame) -> pd.DataFrame:
    """Replace the columns of ``analysis`` in the run's results table and write it.

    table: [n_features, metrics] with single-level string columns and index
    feature_id (int). Other analyses' columns are kept (outer join on feature_id).
    Writes results.parquet and results.csv atomically; returns the merged table.
    """
    if not isinstance(analysis, str) or not analysis:
        raise InputError(f"analysis name must be a non-empty string, got {analysis!r}")
    if isinstance(table.columns, pd.MultiIndex):
        raise InputError(f"results for {analysis!r} must have single-level metric columns, got a MultiIndex")
    bad = [c for c in table.columns if not isinstance(c, str)]
    if bad:
        raise InputError(f"results for {analysis!r}: column names must be strings, got {bad[:5]!r}")
    if not pd.api.types.is_integer_dtype(table.index.dtype):
        raise InputError(f"results for {analysis!r}: index must be integer feature ids, got {table.index.dtype}")
    new = table.copy()
    new.columns = pd.MultiIndex.from_product([[analysis], list(table.columns)], names=COLUMN_LEVELS)
    new.index = pd.Index(new.index.astype(np.int64), name=INDEX_NAME)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / RESULTS_PARQUET).exists() or (out_dir / RESULTS_CSV).exists():
        old = read_results(out_dir)
        old = old.loc[:, old.columns.get_level_values(0) != analysis]
        merged = old.join(new, how="outer") if old.shape[1] else new
    else:
        merged = new
    merged = _normalise(merged.sort_index())
    _atomic_write(out_dir / RESULTS_PARQUET, lambda p: merged.to_parquet(p))
    _atomic_write(out_dir / RESULTS_CSV, lambda p: merged.to_csv(p))
    return merged


# --------------------------------------------------------------------------- entry point


def analyze_features(cfg) -> pd.DataFrame:
    """Run the analyses switched on in ``cfg.analysis`` on a run's ``features/features.h5ad``;
    results go to ``<run>/analysis/results.{csv,parquet}`` (one column group per analysis)."""
    import anndata as ad

    from sae4scfm.runs import load_run_config, resolve_run_dir

    run_dir = resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp)
    features_file = run_dir / "features" / "features.h5ad"
    if not features_file.is_file():
        raise InputError(f"{features_file} does not exist; run scripts/generate_features.py with the same "
                         "sae_checkpoint.experiment and sae_checkpoint.timestamp first.")
    features = ad.read_h5ad(features_file)
    d_sae = json.loads((run_dir / "cfg.json").read_text())["d_sae"]
    if features.n_vars != d_sae:
        raise InputError(f"{features_file} has {features.n_vars} features but the run's SAE has {d_sae}; "
                         "it belongs to another run: regenerate it with scripts/generate_features.py.")
    out_dir = run_dir / "analysis"
    out_dir.mkdir(exist_ok=True)
    a = cfg.analysis
    table = read_results(out_dir) if (out_dir / "results.parquet").is_file() else None
    if a.run_label_scoring:
        data_cfg = load_run_config(run_dir).data
        keys = list(a.label_keys) if a.label_keys else [k for k in (data_cfg.cell_type_key, data_cfg.batch_key) if k]
        if not keys:
            raise InputError("analysis.label_keys is not set and the run's dataset names no cell_type_key; "
                             "set analysis.label_keys=[<obs column>].")
        X = features.X if a.pooling == "max" else features.layers[a.pooling]
        scores = label_scoring(X, features.obs, keys, min_cells=int(a.min_cells))
        table = update_results(out_dir, "label_scoring", scores)
        print_top_features(scores, keys, int(a.top_n))
    if table is None:
        raise InputError("no analysis selected; set e.g. analysis.run_label_scoring=true.")
    print(f"results: {out_dir / 'results.csv'} and {out_dir / 'results.parquet'}")
    return table


def print_top_features(scores: pd.DataFrame, keys: list[str], top_n: int) -> None:
    """Print the ``top_n`` features by AUROC for every label value."""
    for key in keys:
        print(f"top features by AUROC for {key}:")
        for col in (c for c in scores.columns if c.startswith(f"auroc:{key}=")):
            top = scores[col].nlargest(top_n)
            listed = ", ".join(f"{i} ({v:.3f})" for i, v in top.items())
            print(f"  {col.split('=', 1)[1]:<32s} {listed}")
