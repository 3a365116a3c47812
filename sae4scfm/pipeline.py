"""What every stage does first: load the model and the data, tokenize, and extract (cached)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sae4scfm import __version__
from sae4scfm.activations import ActivationStore, extract_activations
from sae4scfm.data import describe, load_dataset
from sae4scfm.errors import InputError
from sae4scfm.scfm import ScFMAdapter, load_scfm
from sae4scfm.scfm.demo import cache_root
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


def activation_stores(cfg: DictConfig, adapter: ScFMAdapter, adata: ad.AnnData, tokens: TokenizedCells,
                      layers: list[int]) -> dict[str, dict[int, ActivationStore]]:
    """{"train"|"eval": {layer: store}}, extracted once and cached under a key of everything
    that determines them (model, data, layers' storage settings, package version)."""
    key_src = {"scfm": OmegaConf.to_container(cfg.scfm, resolve=True),
               "data": OmegaConf.to_container(cfg.data, resolve=True),
               "dtype": cfg.buffer.dtype, "include_special": cfg.buffer.include_special, "v": __version__}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.buffer.store_dir or cache_root() / "activations") / key
    stores = {}
    for split in ("train", "eval"):
        stores[split] = extract_activations(
            adapter, split_tokens(tokens, adata, split), layers, root / split,
            batch_size=cfg.buffer.extract_batch_size, shard_tokens=cfg.buffer.shard_tokens,
            dtype=cfg.buffer.dtype, include_special=cfg.buffer.include_special,
            desc=f"extracting {split} activations",
        )
    return stores


def load_model_and_data(cfg: DictConfig, device: str) -> tuple[ScFMAdapter, ad.AnnData, TokenizedCells]:
    torch.manual_seed(int(cfg.seed))  # random_init models are reproducible
    adapter = load_scfm(cfg.scfm, device)
    adapter.check_layer(cfg.sae.target_layer)
    adata = load_dataset(cfg.data)
    return adapter, adata, tokenize_dataset(adapter, adata, cfg.data)
