"""TileDB-SOMA experiments (local folders, s3:// URIs, the CELLxGENE Census), read in chunks of cells.

Only the obs rows selected by ``obs_value_filter`` (then ``n_cells`` of them, seeded) and the obs
columns asked for are read; X is read ``chunk_cells`` rows at a time. ``SomaCells`` is the picklable
handle on the selected cells that readers (DataLoader workers included) use to fetch rows on demand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae4scfm.errors import InputError

log = logging.getLogger(__name__)

OBS_NAME_COLUMN = "obs_id"  # tiledbsoma.io.from_anndata's column for obs_names (var: var_id)
VAR_NAME_COLUMN = "var_id"
DEFAULT_CHUNK_CELLS = 4096


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError as e:
        raise InputError("data=soma/census needs tiledbsoma: pip install tiledbsoma==2.3.0") from e
    return tiledbsoma


@dataclass(eq=False)
class SomaCells:
    """Selected cells of one SOMA experiment: X rows read on demand, no handle kept when pickled.

    ``obs_joinids`` [cells] int64 (sorted, the cells' order), ``var_joinids`` [genes] int64 (sorted);
    ``census`` = {"census_version", "organism"} re-opens the Census instead of ``uri``.
    """

    uri: str
    measurement: str
    layer: str
    obs_joinids: np.ndarray
    var_joinids: np.ndarray
    census: dict | None = None
    _exp: object = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.obs_joinids)

    def __getstate__(self):
        return {**self.__dict__, "_exp": None}  # no open TileDB handle crosses a process boundary

    def experiment(self):
        if self._exp is None:
            self._exp = open_experiment(self.uri, self.census)
        return self._exp

    def close(self) -> None:
        if self._exp is not None:
            self._exp.close()
            self._exp = None

    def read_X(self, positions: np.ndarray) -> sp.csr_matrix:
        """X [len(positions), genes] float32 (CSR) of the cells at ``positions`` (in that order)."""
        ids = self.obs_joinids[np.asarray(positions, dtype=np.int64)]
        unique = np.unique(ids)  # sorted; a cell asked for twice is read once
        X = self.experiment().ms[self.measurement].X[self.layer]
        rows, cols, vals = [], [], []
        for tbl in X.read(coords=(unique, self.var_joinids)).tables():
            rows.append(np.searchsorted(unique, tbl["soma_dim_0"].to_numpy()))
            cols.append(np.searchsorted(self.var_joinids, tbl["soma_dim_1"].to_numpy()))
            vals.append(tbl["soma_data"].to_numpy().astype(np.float32, copy=False))
        cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))
        out = sp.csr_matrix((cat(vals, np.float32), (cat(rows, np.int64), cat(cols, np.int64))),
                            shape=(len(unique), len(self.var_joinids)), dtype=np.float32)
        return out[np.searchsorted(unique, ids)]  # in the order of ``positions``


def open_experiment(uri: str | None, census: dict | None = None):
    """An open ``tiledbsoma.Experiment``: ``uri``, or the Census experiment of ``census`` (online)."""
    if census is not None:
        try:
            import cellxgene_census
        except ImportError as e:
            raise InputError("data=census needs cellxgene-census: pip install cellxgene-census==1.18.0") from e
        try:
            handle = cellxgene_census.open_soma(census_version=str(census["census_version"]))
        except Exception as e:  # noqa: BLE001 - offline machines, unknown versions: one line for the user
            raise InputError(f"data=census: could not open CELLxGENE Census {census['census_version']!r} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the Census "
                             "is read over the internet: check the connection and data.census_version.") from e
        organisms = list(handle["census_data"].keys())
        if census["organism"] not in organisms:
            raise InputError(f"data.organism={census['organism']!r} is not in the Census; "
                             f"valid: {', '.join(organisms)}.")
        return handle["census_data"][census["organism"]]
    tiledbsoma = _tiledbsoma()
    if not uri:
        raise InputError("data.uri is not set; run with data=soma data.uri=/path/to/experiment (or s3://...).")
    try:
        return tiledbsoma.Experiment.open(str(uri))
    except Exception as e:  # noqa: BLE001 - DoesNotExistError, wrong object type, bad credentials
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"data.uri={uri}: not a TileDB-SOMA experiment ({type(e).__name__}: {first}); point "
                         "it at a folder written by tiledbsoma.io.from_anndata or an s3:// experiment.") from e


def _check_names(asked: list[str], available: list[str], field_name: str, what: str) -> None:
    missing = [c for c in asked if c not in available]
    if missing:
        raise InputError(f"{field_name}: {what} has no column {missing[0]!r}; available: {', '.join(available)}.")


def select_cells(cfg) -> tuple[SomaCells, pd.DataFrame, pd.DataFrame]:
    """(cells, obs [cells, asked columns], var [genes]) selected by a ``data=soma``/``census`` config.

    obs holds the cells passing ``obs_value_filter``, then ``n_cells`` of them drawn with ``seed``
    (sorted by soma_joinid); its columns are ``obs_columns`` plus the cell-type/batch/condition keys
    (and ``soma_joinid``); obs_names are the ``obs_id`` column when the experiment has one, else the
    soma_joinid. var holds the genes passing ``var_value_filter``, all var columns.
    """
    from sae4scfm.data import sample_cells

    census = ({"census_version": cfg.census_version, "organism": cfg.organism}
              if cfg.name == "census" else None)
    uri = None if census else cfg.get("uri")
    exp = open_experiment(uri, census)
    where = f"data.uri={uri}" if uri else f"Census {census['census_version']}"
    measurement = str(cfg.get("measurement") or "RNA")
    if measurement not in exp.ms:
        raise InputError(f"data.measurement={measurement!r}: {where} has no such measurement; "
                         f"valid: {', '.join(exp.ms.keys())}.")
    layer = str(cfg.get("layer") or "raw")
    if layer not in exp.ms[measurement].X:
        raise InputError(f"data.layer={layer!r}: measurement {measurement!r} of {where} has no X layer "
                         f"{layer!r}; valid: {', '.join(exp.ms[measurement].X.keys())}.")
    obs_names = exp.obs.schema.names
    keys = [cfg.get(k) for k in ("cell_type_key", "batch_key", "condition_key")]
    asked = list(cfg.get("obs_columns") or [])
    _check_names(asked, obs_names, "data.obs_columns", f"obs of {where}")
    columns = ["soma_joinid", *dict.fromkeys(c for c in [*asked, *keys, OBS_NAME_COLUMN]
                                             if c and c in obs_names and c != "soma_joinid")]
    obs = _read_frame(exp.obs, cfg.get("obs_value_filter"), columns, "data.obs_value_filter", where)
    if not len(obs):
        raise InputError(f"data.obs_value_filter={cfg.get('obs_value_filter')!r} selects no cells of {where}; "
                         "check the column names and values (e.g. tissue_general == 'blood').")
    obs = obs.sort_values("soma_joinid", kind="stable")
    obs = obs.iloc[sample_cells(len(obs), cfg.get("n_cells"), int(cfg.get("seed", 0)))]
    obs.index = (obs.pop(OBS_NAME_COLUMN).astype(str) if OBS_NAME_COLUMN in obs and OBS_NAME_COLUMN not in asked
                 else obs["soma_joinid"].astype(str)).to_numpy()
    for c in obs.columns:  # arrow dictionaries arrive as categoricals already; strings become categories
        if obs[c].dtype == object:
            obs[c] = obs[c].astype("category")
    var_frame = exp.ms[measurement].var
    var = _read_frame(var_frame, cfg.get("var_value_filter"), None, "data.var_value_filter", where)
    if not len(var):
        raise InputError(f"data.var_value_filter={cfg.get('var_value_filter')!r} selects no genes of {where}.")
    var = var.sort_values("soma_joinid", kind="stable")
    var.index = (var.pop(VAR_NAME_COLUMN) if VAR_NAME_COLUMN in var else var["soma_joinid"]).astype(str).to_numpy()
    cells = SomaCells(str(uri) if uri else "", measurement, layer,
                      obs["soma_joinid"].to_numpy(np.int64), var["soma_joinid"].to_numpy(np.int64), census, exp)
    return cells, obs, var


def _read_frame(frame, value_filter, columns, field_name: str, where: str) -> pd.DataFrame:
    try:
        return frame.read(value_filter=value_filter or None, column_names=columns).concat().to_pandas()
    except Exception as e:  # noqa: BLE001 - a filter that does not parse or names an unknown column
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{field_name}={value_filter!r} could not be applied to {where} ({first}); "
                         f"columns: {', '.join(frame.schema.names)}.") from e


def chunk_size(cfg) -> int:
    n = int(cfg.get("chunk_cells") or DEFAULT_CHUNK_CELLS)
    if n < 1:
        raise InputError(f"data.chunk_cells={n}: use a positive number of cells per chunk.")
    return n


def load_soma(cfg) -> ad.AnnData:
    """The selected cells in memory: X [cells, genes] CSR float32 read ``chunk_cells`` rows at a time."""
    cells, obs, var = select_cells(cfg)
    step = chunk_size(cfg)
    try:
        parts = [cells.read_X(np.arange(s, min(s + step, len(cells)))) for s in range(0, len(cells), step)]
    finally:
        cells.close()
    adata = ad.AnnData(X=sp.vstack(parts, format="csr", dtype=np.float32), obs=obs, var=var)
    log.info("%s: %d cells x %d genes read in %d chunks of <= %d cells", cells.uri or "Census",
             adata.n_obs, adata.n_vars, len(parts), step)
    return adata
