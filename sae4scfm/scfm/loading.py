"""What every stage does first: pick the device, load the model and the data, tokenize."""

from __future__ import annotations

import anndata as ad
import numpy as np
import torch
from omegaconf import DictConfig

from sae4scfm.data import describe, load_dataset
from sae4scfm.errors import InputError
from sae4scfm.scfm import load_scfm
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import TokenizedCells


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={name}: CUDA is not available on this machine; use device=cpu or auto.")
    return name


def tokenize_dataset(adapter: ScFMAdapter, adata: ad.AnnData, data_cfg: DictConfig) -> TokenizedCells:
    """The model's tokens for every cell of ``adata``, with the ``data.preprocess`` settings."""
    pp = data_cfg.preprocess
    return adapter.tokenize(
        adata, gene_key=data_cfg.get("gene_key"), input_kind=pp.input_kind,
        normalize_total=pp.normalize_total, log1p=pp.log1p, subset_hvg=pp.subset_hvg,
        n_hvg=pp.n_hvg, seed=int(data_cfg.seed), source=describe(data_cfg),
    )


def split_tokens(tokens: TokenizedCells, adata: ad.AnnData, split: str) -> TokenizedCells:
    return tokens.subset(np.flatnonzero(adata.obs["split"].to_numpy() == split))


def load_model_and_data(cfg: DictConfig, device: str) -> tuple[ScFMAdapter, ad.AnnData, TokenizedCells]:
    adata = load_dataset(cfg.data)  # first: a bad data file is reported before a model is loaded (or built)
    torch.manual_seed(int(cfg.seed))  # random_init models are reproducible
    adapter = load_scfm(cfg.scfm, device)
    adapter.check_layer(cfg.sae.target_layer)
    return adapter, adata, tokenize_dataset(adapter, adata, cfg.data)
