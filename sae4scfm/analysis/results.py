"""The per-run results, in two shapes written side by side in ``<run>/analysis/``:

- wide: ``results.{parquet,csv}``, index ``feature_id`` (int), columns ``(analysis, metric)``
  with string names such as ``auroc:bulk_labels=CD56+ NK`` (CSV header rows ``analysis`` and
  ``metric``);
- tidy (long): ``results_long.{parquet,csv}``, one row per feature x wide column, columns
  :data:`TIDY_COLUMNS` = ``feature_id, analysis, label_key, label, metric, value, text``:
  the same numbers with the label in its own columns, so no reader parses a metric name
  (``auroc:bulk_labels=CD56+ NK`` is ``label_key=bulk_labels, label=CD56+ NK, metric=auroc``).
  ``value`` is float64 (booleans 0/1); text-valued metrics (gene lists, best label, best set)
  have ``value`` NaN and the string in ``text``.

An analysis names the structure of its labelled columns in ``table.attrs["tidy"]``:
``{wide column: (label_key, label, metric)}`` (see :func:`labelled`); any other column is its
own metric with no label. Re-running one analysis replaces only its rows/columns in both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sae4scfm.analysis.labels import INDEX_NAME
from sae4scfm.atomic import atomic_write
from sae4scfm.errors import InputError

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
TIDY_PARQUET = "results_long.parquet"
TIDY_CSV = "results_long.csv"
COLUMN_LEVELS = ["analysis", "metric"]
TIDY_COLUMNS = ["feature_id", "analysis", "label_key", "label", "metric", "value", "text"]


def labelled(table: pd.DataFrame, keys: dict[str, tuple[str | None, str | None, str]]) -> pd.DataFrame:
    """``table`` with ``attrs["tidy"]`` updated by ``keys`` ({wide column: (label_key, label, metric)})."""
    table.attrs["tidy"] = {**table.attrs.get("tidy", {}), **keys}
    return table


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


def read_tidy_results(out_dir) -> pd.DataFrame:
    """The run's long results table [rows, :data:`TIDY_COLUMNS`] (parquet if present, else CSV)."""
    out_dir = Path(out_dir)
    pq, csv = out_dir / TIDY_PARQUET, out_dir / TIDY_CSV
    if pq.exists():
        return pd.read_parquet(pq)
    if csv.exists():
        return pd.read_csv(csv, keep_default_na=False, na_values={"value": [""], "label_key": [""], "label": [""],
                                                                 "text": [""]},
                           dtype={"label_key": object, "label": object, "text": object},
                           float_precision="round_trip")
    raise InputError(f"no long results table in {out_dir} (expected {TIDY_PARQUET} or {TIDY_CSV}); "
                     "run an analysis on this run directory first")


def tidy(analysis: str, table: pd.DataFrame) -> pd.DataFrame:
    """The long form [n_features x n_columns, :data:`TIDY_COLUMNS`] of one analysis's table."""
    keys = table.attrs.get("tidy", {})
    parts = []
    for col in table.columns:
        label_key, label, metric = keys.get(col, (None, None, col))
        s = table[col]
        numeric = pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_bool_dtype(s.dtype)
        parts.append(pd.DataFrame({
            "feature_id": table.index.to_numpy(np.int64), "analysis": analysis,
            "label_key": None if label_key is None else str(label_key), "label": None if label is None else str(label),
            "metric": str(metric),
            "value": s.to_numpy(np.float64) if numeric else np.nan,
            "text": None if numeric else s.astype(object).where(s.notna(), None).map(
                lambda v: None if v is None else str(v)).to_numpy(object),
        }))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=np.float64 if c == "value" else np.int64 if c == "feature_id" else
                                          object) for c in TIDY_COLUMNS})
    out = pd.concat(parts, ignore_index=True)
    for c in ("label_key", "label", "text"):
        out[c] = out[c].astype(object)
    return out[TIDY_COLUMNS]


def _check(analysis: str, table: pd.DataFrame) -> None:
    if not isinstance(analysis, str) or not analysis:
        raise InputError(f"analysis name must be a non-empty string, got {analysis!r}")
    if isinstance(table.columns, pd.MultiIndex):
        raise InputError(f"results for {analysis!r} must have single-level metric columns, got a MultiIndex")
    bad = [c for c in table.columns if not isinstance(c, str)]
    if bad:
        raise InputError(f"results for {analysis!r}: column names must be strings, got {bad[:5]!r}")
    if not pd.api.types.is_integer_dtype(table.index.dtype):
        raise InputError(f"results for {analysis!r}: index must be integer feature ids, got {table.index.dtype}")


def update_results(out_dir, analysis: str, table: pd.DataFrame) -> pd.DataFrame:
    """Replace the part of ``analysis`` in the run's wide and long results tables and write both.

    table: [n_features, metrics] with single-level string columns, index feature_id (int)
    and, for labelled columns, ``attrs["tidy"]`` (module docstring). Other analyses' columns
    and rows are kept (outer join on feature_id). Writes results.{parquet,csv} and
    results_long.{parquet,csv} atomically; returns the merged wide table.
    """
    _check(analysis, table)
    new = table.copy()
    new.columns = pd.MultiIndex.from_product([[analysis], list(table.columns)], names=COLUMN_LEVELS)
    new.index = pd.Index(new.index.astype(np.int64), name=INDEX_NAME)
    long_new = tidy(analysis, table)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / RESULTS_PARQUET).exists() or (out_dir / RESULTS_CSV).exists():
        old = read_results(out_dir)
        old = old.loc[:, old.columns.get_level_values(0) != analysis]
        merged = old.join(new, how="outer") if old.shape[1] else new
    else:
        merged = new
    if (out_dir / TIDY_PARQUET).exists() or (out_dir / TIDY_CSV).exists():
        old_long = read_tidy_results(out_dir)
        long = pd.concat([old_long[old_long["analysis"] != analysis], long_new], ignore_index=True)
    else:
        long = long_new
    merged = _normalise(merged.sort_index())
    atomic_write(out_dir / RESULTS_PARQUET, lambda p: merged.to_parquet(p))
    atomic_write(out_dir / RESULTS_CSV, lambda p: merged.to_csv(p))
    atomic_write(out_dir / TIDY_PARQUET, lambda p: long.to_parquet(p, index=False))
    atomic_write(out_dir / TIDY_CSV, lambda p: long.to_csv(p, index=False))
    return merged


def write_feature_annotations(features_file, analysis: str, table: pd.DataFrame, params: dict,
                              key_added: str | None = None) -> None:
    """Write one analysis's per-feature table into ``features.h5ad`` as scanpy does: ``var`` columns
    ``<key_added>:<metric>`` (``key_added`` defaults to the analysis name; '/' in a name, which h5
    stores reject, becomes '_'), replacing that prefix's old columns, and ``uns[key_added]`` =
    ``{"analysis": analysis, "params": params}``. Written atomically; only ``var`` and ``uns`` are read:
    the [cells, d_sae] matrices are copied into the new file by HDF5 a block at a time."""
    import h5py
    from anndata.io import read_elem, write_elem

    key = key_added or analysis
    features_file = Path(features_file)
    with h5py.File(features_file, "r") as f:
        var = read_elem(f["var"])
    n_vars = len(var)
    if len(table) and (table.index.min() < 0 or table.index.max() >= n_vars):
        raise InputError(f"results for {analysis!r} name features outside 0..{n_vars - 1} of {features_file}")
    var = var.loc[:, [c for c in var.columns if not str(c).startswith(f"{key}:")]]
    new = table.reindex(range(n_vars))
    new.columns = [f"{key}:{c}".replace("/", "_") for c in table.columns]
    new.index = var.index
    for c in new.columns:
        if new[c].dtype == object:  # h5ad string columns: no mixed None/float
            new[c] = new[c].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))

    def write(tmp):
        with h5py.File(features_file, "r") as src, h5py.File(tmp, "w") as dst:
            dst.attrs.update(src.attrs)
            for name in src:
                if name not in ("var", "uns"):
                    src.copy(src[name], dst, name=name)
            write_elem(dst, "var", pd.concat([var, new], axis=1))
            uns = dst.create_group("uns")
            if "uns" in src:
                uns.attrs.update(src["uns"].attrs)
                for name in src["uns"]:
                    if name != key:
                        src.copy(src["uns"][name], uns, name=name)
            else:
                uns.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
            write_elem(uns, key, {"analysis": analysis, "params": _h5_safe(params)})

    atomic_write(features_file, write)


def _h5_safe(obj):
    """Config values as h5ad can store them in uns (None -> "null")."""
    if isinstance(obj, dict):
        return {str(k): _h5_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_h5_safe(v) for v in obj] if all(not isinstance(v, (dict, list)) for v in obj) and obj else \
            {str(i): _h5_safe(v) for i, v in enumerate(obj)}
    return "null" if obj is None else obj
