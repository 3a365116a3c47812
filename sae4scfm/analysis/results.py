"""The per-run results table: index ``feature_id`` (int), columns ``(analysis, metric)`` with
string names, stored as ``results.parquet`` and ``results.csv`` (header rows ``analysis`` and ``metric``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sae4scfm.analysis.labels import INDEX_NAME
from sae4scfm.atomic import atomic_write
from sae4scfm.errors import InputError

RESULTS_PARQUET = "results.parquet"


RESULTS_CSV = "results.csv"


COLUMN_LEVELS = ["analysis", "metric"]


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
    atomic_write(out_dir / RESULTS_PARQUET, lambda p: merged.to_parquet(p))
    atomic_write(out_dir / RESULTS_CSV, lambda p: merged.to_csv(p))
    return merged
