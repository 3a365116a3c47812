"""Extraction: run a model over tokenized cells once and write the hooked activations of each
layer into a sharded store (``store.shards``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sae4scfm import __version__
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.demo import cache_root
from sae4scfm.scfm.loading import split_tokens
from sae4scfm.scfm.tokens import TokenizedCells
from sae4scfm.store.shards import ActivationStore, _ShardWriter


@torch.no_grad()
def extract_activations(adapter: ScFMAdapter, tokens: TokenizedCells, layers: list[int], out_dir: str | Path, *,
                        batch_size: int = 32, shard_tokens: int = 65536, dtype: str = "float32",
                        include_special: bool = False, desc: str = "extracting") -> dict[int, ActivationStore]:
    """Run the model over ``tokens`` once and store the residual stream of every layer in
    ``layers`` under ``out_dir/layer_<l>``. Gene tokens only unless ``include_special``
    (padding is never stored). Finished stores are reused as they are."""
    out_dir = Path(out_dir)
    stores = {layer: out_dir / f"layer_{layer}" for layer in layers}
    todo = [layer for layer, path in stores.items() if not (path / "meta.json").is_file()]
    if todo:
        writers = {}
        for layer in todo:
            partial = stores[layer].with_name(stores[layer].name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            writers[layer] = _ShardWriter(partial, layer, adapter.d_model, dtype, shard_tokens, include_special)
        with tqdm(total=len(tokens), desc=desc, unit="cell") as bar:
            for batch in tokens.batches(adapter.cells_per_batch(batch_size)):
                hidden = adapter.capture(batch, todo)
                keep = (batch.gene_mask | (~batch.padding_mask if include_special else batch.gene_mask)).to(adapter.device)
                cell = batch.cell_index[:, None].expand_as(batch.gene_ids).to(adapter.device)[keep]
                gene = batch.gene_ids.to(adapter.device)[keep]
                special = ~batch.gene_mask.to(adapter.device)[keep]
                for layer in todo:
                    writers[layer].add(hidden[layer][keep], cell, gene, special)
                bar.update(len(batch.cell_index))
        for layer in todo:
            writers[layer].close(len(tokens))
            shutil.rmtree(stores[layer], ignore_errors=True)
            writers[layer].root.rename(stores[layer])
    return {layer: ActivationStore(path) for layer, path in stores.items()}


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
