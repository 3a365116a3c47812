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


@dataclass
class RunData:
    """A run's features and the data they were computed on, loaded once for every analysis."""

    run_dir: Path
    out_dir: Path
    run_cfg: DictConfig
    sae_cfg: dict
    features: ad.AnnData  # cells x features (X = max-pooled, layers["mean"])
    tokens: ad.AnnData | None  # tokens x features (obs: cell_index, gene, gene_id), if written
    cache: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.features.n_vars

    @property
    def cell_type_key(self) -> str | None:
        return self.run_cfg.data.get("cell_type_key")

    def dataset(self) -> ad.AnnData:
        """The run's cells (same order as ``features``), as the loader gives them."""
        if "adata" not in self.cache:
            from sae4scfm.data import load_dataset

            adata = load_dataset(self.run_cfg.data)
            if not np.array_equal(adata.obs_names.to_numpy(), self.features.obs_names.to_numpy()):
                raise InputError(f"{self.run_dir}/features/features.h5ad does not hold the cells of the run's "
                                 "dataset (different cells or order); regenerate it with scripts/generate_features.py.")
            self.cache["adata"] = adata
        return self.cache["adata"]

    def expression(self) -> tuple[sp.csr_matrix, list[str]]:
        """log1p(CP10k) expression [cells, genes] of the universe genes found in the data, and those genes."""
        if "expression" not in self.cache:
            from sae4scfm.data import normalise_expression

            adata = self.dataset()
            key = self.run_cfg.data.get("gene_key")
            names = (adata.var[key] if key else adata.var_names.to_series()).astype(str).to_numpy()
            if self.tokens is not None:
                seen = set(self.tokens.obs["gene"].astype(str).unique())
                cols = np.flatnonzero([g in seen for g in names])
            else:
                cols = np.arange(len(names))
            _, first = np.unique(names[cols], return_index=True)  # one column per gene
            cols = cols[np.sort(first)]
            pp = self.run_cfg.data.preprocess
            X = sp.csr_matrix(adata.X[:, cols] if not adata.isbacked else adata[:, cols].X)
            self.cache["expression"] = (normalise_expression(X, pp.input_kind, 1e4, True, str(self.run_dir)),
                                        [str(g) for g in names[cols]])
        return self.cache["expression"]

    def universe(self) -> list[str]:
        return self.expression()[1]

    def library_size(self) -> np.ndarray:
        adata = self.dataset()
        return np.asarray(adata.X.sum(axis=1)).ravel()


def load_run_data(cfg: DictConfig) -> RunData:
    run_dir = resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp)
    features_file = run_dir / "features" / "features.h5ad"
    if not features_file.is_file():
        raise InputError(f"{features_file} does not exist; run scripts/generate_features.py with the same "
                         "sae_checkpoint.experiment and sae_checkpoint.timestamp first.")
    sae_cfg = json.loads((run_dir / "cfg.json").read_text())
    features = ad.read_h5ad(features_file)
    if features.n_vars != sae_cfg["d_sae"]:
        raise InputError(f"{features_file} has {features.n_vars} features but the run's SAE has {sae_cfg['d_sae']}; "
                         "it belongs to another run: regenerate it with scripts/generate_features.py.")
    token_file = run_dir / "features" / "token_features.h5ad"
    tokens = ad.read_h5ad(token_file) if token_file.is_file() else None
    if tokens is not None and tokens.n_vars != features.n_vars:
        raise InputError(f"{token_file} has {tokens.n_vars} features but {features_file} has {features.n_vars}; "
                         "regenerate both with scripts/generate_features.py.")
    out_dir = run_dir / "analysis"
    out_dir.mkdir(exist_ok=True)
    return RunData(run_dir, out_dir, load_run_config(run_dir), sae_cfg, features, tokens)


def need_tokens(run: RunData, what: str) -> ad.AnnData:
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
