"""The analyze stage's inputs: a run's features and the data they were computed on, loaded once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from omegaconf import DictConfig

from sae4scfm.errors import InputError
from sae4scfm.runs import load_run_config, resolve_run_dir

GENE_NAME = "gene_name"  # token_features.h5ad obs column: the dataset's name of the token's gene


@dataclass
class RunData:
    """A run's features and the data they were computed on, loaded once for every analysis."""

    run_dir: Path
    out_dir: Path
    run_cfg: DictConfig
    sae_cfg: dict
    features: ad.AnnData  # cells x features (X = the representation ``representation``; no layers)
    tokens: "TokenFeatures | None"  # tokens x features (obs: cell_index, gene, gene_name, gene_id), if written;
    # backed in the analyze stage (X left in the file, streamed by the token statistics)
    cache: dict = field(default_factory=dict)
    representation: str = "max"  # the cell representation in features.X (analysis.pooling)

    @property
    def n_features(self) -> int:
        return self.features.n_vars

    @property
    def cell_type_key(self) -> str | None:
        return self.run_cfg.data.get("cell_type_key")

    def dataset(self) -> ad.AnnData:
        """The run's cells (same order as ``features``), as the loader gives them; with ``data.stream`` obs and
        var only (X None, read in chunks by ``count_blocks``), as the extraction read them."""
        if "adata" not in self.cache:
            from sae4scfm.data import load_dataset, open_dataset

            if self.run_cfg.data.get("stream"):
                adata, self.cache["reader"] = open_dataset(self.run_cfg.data)
            else:
                adata, self.cache["reader"] = load_dataset(self.run_cfg.data), None
            check_run_features(self.run_dir, self.features, adata)
            self.cache["adata"] = adata
        return self.cache["adata"]

    def count_blocks(self):
        """(cell rows, CSR [rows, genes] float32) blocks of the dataset's X in cell order, ``data.chunk_cells``
        cells at a time: read from the source when streamed (``data.stream``), so the whole matrix is never in
        memory, else sliced from the loaded X."""
        from sae4scfm.data.soma import chunk_size
        from sae4scfm.data.stream import chunk_rows

        adata = self.dataset()
        reader = self.cache.get("reader")  # None: the loaded X (also a dataset put in the cache)
        for rows in chunk_rows(adata.n_obs, chunk_size(self.run_cfg.data)):
            X = reader.read(rows).X if reader is not None else adata.X[rows]
            yield rows, sp.csr_matrix(X, dtype=np.float32)

    def expression(self) -> tuple[sp.csr_matrix, list[str]]:
        """log1p(CP10k) expression [cells, genes] of the universe genes, and those genes.

        The universe is always the genes the model saw: the genes of the run's tokens, by the
        dataset's names (``var[data.gene_key]`` or var_names), found in the data: features.h5ad
        ``uns["sae4scfm"]["genes_seen"]`` (written by generate_features, also for cell-level SAEs), else
        token_features.h5ad obs ``gene_name``. Without either it is unknown: InputError (never every
        gene of the file, which would include genes outside the model's vocabulary / HVGs).
        """
        if "expression" not in self.cache:
            from sae4scfm.data import normalise_expression

            recorded = self.features.uns.get("sae4scfm", {}).get("genes_seen")
            if recorded is not None:
                seen = {str(g) for g in recorded}
            else:
                tokens = need_tokens(self, "the gene universe (the genes the model saw, for gene scores and enrichment)")
                seen = set(tokens.obs[GENE_NAME].astype(str).unique())
            adata = self.dataset()
            key = self.run_cfg.data.get("gene_key")
            names = (adata.var[key] if key else adata.var_names.to_series()).astype(str).to_numpy()
            cols = np.flatnonzero([g in seen for g in names])
            if len(cols) == 0:
                raise InputError(
                    f"{self.run_dir}/features/token_features.h5ad: none of its token genes (obs {GENE_NAME!r}, e.g. "
                    f"{', '.join(sorted(seen)[:3])}) is a gene of the run's dataset (e.g. {', '.join(names[:3])}), so "
                    "the gene universe is empty; regenerate the features with scripts/generate_features.py "
                    "(it writes the dataset's gene names) or set data.gene_key to the var column the run used.")
            _, first = np.unique(names[cols], return_index=True)  # one column per gene
            cols = cols[np.sort(first)]
            pp = self.run_cfg.data.preprocess
            blocks, sizes = [], []  # one pass over the counts: the universe columns and every cell's library size
            for _, X in self.count_blocks():
                sizes.append(_row_sums(X))
                blocks.append(X[:, cols])
            self.cache["library_size"] = np.concatenate([np.zeros(0), *sizes])
            X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((adata.n_obs, len(cols)), dtype=np.float32)
            del blocks
            self.cache["expression"] = (normalise_expression(X, pp.input_kind, 1e4, True, str(self.run_dir)),
                                        [str(g) for g in names[cols]])
        return self.cache["expression"]

    def universe(self) -> list[str]:
        return self.expression()[1]

    def library_size(self) -> np.ndarray:
        """[cells] total counts over every gene of the dataset (``count_blocks``; kept from ``expression``'s pass)."""
        if "library_size" not in self.cache:
            self.cache["library_size"] = np.concatenate([np.zeros(0), *(_row_sums(X) for _, X in self.count_blocks())])
        return self.cache["library_size"]


def _row_sums(X: sp.csr_matrix) -> np.ndarray:
    return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()


class TokenColumns:
    """token_features.h5ad's obs columns, each read from the file on first use and kept (pd.Series with a
    RangeIndex). At millions of tokens a DataFrame of every column is most of the analyze stage's memory
    (pandas also copies same-dtype columns into one block), and most analyses read one column or none.
    Supports ``obs[c]``, ``c in obs``, ``obs.columns`` and ``obs[c] = values``."""

    def __init__(self, path: Path, names: list[str], n_rows: int):
        self.path, self._names, self._n, self._read = Path(path), list(names), int(n_rows), {}

    @property
    def columns(self) -> pd.Index:
        return pd.Index(self._names)

    def __contains__(self, name) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, name: str) -> pd.Series:
        if name not in self._read:
            if name not in self._names:
                raise KeyError(f"{self.path} obs has no column {name!r} (columns: {self._names})")
            import h5py
            from anndata.io import read_elem

            with h5py.File(self.path, "r") as f:
                self._read[name] = pd.Series(read_elem(f["obs"][name]), name=name)
        return self._read[name]

    def __setitem__(self, name: str, values) -> None:
        series = values.reset_index(drop=True) if isinstance(values, pd.Series) else pd.Series(np.asarray(values))
        if len(series) != self._n:
            raise ValueError(f"obs column {name!r} needs {self._n} values, got {len(series)}")
        self._read[name] = series.rename(name)  # a categorical stays categorical
        if name not in self._names:
            self._names.append(name)


@dataclass
class TokenFeatures:
    """token_features.h5ad read lean: ``obs`` its columns read on first use (``TokenColumns``; the file's row
    names are the row numbers and are never read), ``X`` [tokens, d_sae] CSR in memory or, backed, anndata's
    sparse dataset of the open file (row slices on demand), ``var`` the features."""

    obs: TokenColumns
    X: object
    var: pd.DataFrame

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    @property
    def n_vars(self) -> int:
        return self.X.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.X.shape

    @property
    def isbacked(self) -> bool:
        return not sp.issparse(self.X)

    @classmethod
    def read(cls, path: Path, backed: bool = False) -> "TokenFeatures":
        import h5py
        from anndata.io import read_elem, sparse_dataset

        f = h5py.File(path, "r")
        var, names = read_elem(f["var"]), [str(c) for c in f["obs"].attrs["column-order"]]
        if backed:
            X = sparse_dataset(f["X"])  # keeps the file open
        else:
            with f:
                X = read_elem(f["X"])
        return cls(TokenColumns(path, names, X.shape[0]), X, var)


def read_run_features(run_dir: Path, name: str = "features.h5ad", backed: bool = False):
    """``<run>/features/<name>`` checked to belong to the run: features.h5ad as an AnnData, token_features.h5ad
    as ``TokenFeatures``; ``backed``: X stays in the file (obs and var are read)."""
    path = features_path(run_dir, name)
    if name == "token_features.h5ad":
        features = TokenFeatures.read(path, backed)
    else:
        features = ad.read_h5ad(path, backed="r" if backed else None)
    check_run_features(run_dir, features, name=name)
    return features


def features_path(run_dir: Path, name: str = "features.h5ad") -> Path:
    path = run_dir / "features" / name
    if not path.is_file():
        raise InputError(f"{path} does not exist; run scripts/generate_features.py with the same "
                         "sae_checkpoint.experiment and sae_checkpoint.timestamp first.")
    return path


def read_cell_features(run_dir: Path, pooling: str | None = None) -> tuple[ad.AnnData, str]:
    """features.h5ad with one cell representation read, and its name: obs, var, uns and, as X, ``pooling``
    (null or ``token``: the file's X; else X or the layer of that name). The file's other representations
    stay on disk: at scale each is a [cells, d_sae] matrix that the analyses never read."""
    import h5py
    from anndata.io import read_elem

    from sae4scfm.features.generate import missing_representation, x_representation

    path = features_path(run_dir)
    with h5py.File(path, "r") as f:
        features = ad.AnnData(obs=read_elem(f["obs"]), var=read_elem(f["var"]),
                              uns=read_elem(f["uns"]) if "uns" in f else {})
        current = x_representation(features)
        name = current if pooling in (None, "token") else str(pooling)
        layers = list(f["layers"]) if "layers" in f else []
        if name != current and name not in layers:
            raise missing_representation(name, [current, *layers], str(path))
        features.X = read_elem(f["X"] if name == current else f["layers"][name])
    check_run_features(run_dir, features)
    return features, name


def check_run_features(run_dir: Path, features: ad.AnnData, adata: ad.AnnData | None = None,
                       name: str = "features.h5ad") -> None:
    """InputError unless ``features`` (cells or tokens x SAE features) has the run's SAE width
    (cfg.json ``d_sae``) and, given the run's dataset ``adata``, its cells in order."""
    path = run_dir / "features" / name
    d_sae = json.loads((run_dir / "cfg.json").read_text())["d_sae"]
    if features.n_vars != d_sae:
        raise InputError(f"{path} has {features.n_vars} features but the run's SAE has d_sae={d_sae} "
                         f"({run_dir / 'cfg.json'}); it belongs to another run: regenerate it with "
                         "scripts/generate_features.py.")
    if adata is not None and not np.array_equal(adata.obs_names.to_numpy(), features.obs_names.to_numpy()):
        raise InputError(f"{path} does not hold the cells of the run's dataset (different cells or order, "
                         f"{features.n_obs} vs {adata.n_obs}); regenerate it with scripts/generate_features.py.")


def load_run_data(cfg: DictConfig) -> RunData:
    """The run addressed by ``cfg.sae_checkpoint`` with the cell representation ``cfg.analysis.pooling``;
    the token features stay in their file (backed) unless the analyses score token rows
    (``analysis.pooling=token``): every token statistic streams them (``primitives.row_blocks``)."""
    pooling = cfg.analysis.get("pooling")
    return open_run(resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp),
                    pooling, backed_tokens=pooling != "token")


def open_run(run_dir: Path, pooling: str | None = None, backed_tokens: bool = False) -> RunData:
    """A run dir's features with the cell representation ``pooling`` in X (``read_cell_features``);
    ``backed_tokens``: token_features.h5ad's X stays in the file (its obs columns are read on use)."""
    sae_cfg = json.loads((run_dir / "cfg.json").read_text())
    features, representation = read_cell_features(run_dir, pooling)
    tokens = (read_run_features(run_dir, "token_features.h5ad", backed=backed_tokens)
              if (run_dir / "features" / "token_features.h5ad").is_file() else None)
    if tokens is not None and GENE_NAME not in tokens.obs:  # written before gene_name existed
        tokens.obs[GENE_NAME] = tokens.obs["gene"]
    out_dir = run_dir / "analysis"
    out_dir.mkdir(exist_ok=True)
    return RunData(run_dir, out_dir, load_run_config(run_dir), sae_cfg, features, tokens,
                   representation=representation)


def need_tokens(run: RunData, what: str) -> TokenFeatures:
    if run.tokens is None:
        raise InputError(f"{what} needs {run.run_dir}/features/token_features.h5ad; rerun "
                         "scripts/generate_features.py with features.token_features=true.")
    return run.tokens


def collection_name(name: str) -> str:
    return Path(str(name)).stem if str(name).endswith(".gmt") else str(name)


def marker_set_for(run: RunData, label: str) -> str | None:
    """The marker set of a cell-type label: ``data.marker_sets[label]``, else the set of the same name."""
    from sae4scfm.analysis.enrichment import load_gene_sets

    mapping = run.run_cfg.data.get("marker_sets") or {}
    if label in mapping:
        return mapping[label]
    return label if label in load_gene_sets("markers") else None


def read_table(run: RunData, name: str) -> pd.DataFrame | None:
    path = run.out_dir / name
    return pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.is_file() else None
