"""Extraction: run a model over tokenized cells once and write the hooked activations of each
layer into a sharded store (``store.shards``): one row per gene token (``sae.hook_point=tokens``,
the default) or one row per cell (``CELL_HOOK_POINTS``: the cell's vector, ``cell_vectors``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sae4scfm import __version__
from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.demo import cache_root
from sae4scfm.scfm.loading import split_tokens
from sae4scfm.scfm.tokens import Batch, TokenizedCells
from sae4scfm.store.shards import ActivationStore, _ShardWriter

# What one SAE input row is: a gene token's residual vector, or one vector per cell (the mean
# over its gene tokens, or its <cls> token's state).
HOOK_POINTS = ("tokens", "cell_mean", "cls")
CELL_HOOK_POINTS = ("cell_mean", "cls")


def sae_hook_point(sae_cfg) -> str:
    """``sae.hook_point`` of an ``sae`` config group (``tokens`` when absent: runs before it existed)."""
    hook = str(sae_cfg.get("hook_point") or "tokens")
    if hook not in HOOK_POINTS:
        raise InputError(f"sae.hook_point={hook!r}: use tokens (one row per gene token), cell_mean (the mean "
                         "of the cell's gene-token residual vectors) or cls (the cell's <cls> token state).")
    return hook


def cls_token_id(adapter: ScFMAdapter, tokens: TokenizedCells) -> int:
    """The vocabulary id of ``<cls>`` for ``sae.hook_point=cls``; an InputError for a model whose
    cells have none (scFoundation, AIDO.Cell, Geneformer V1)."""
    cls_id = adapter.vocab.get("<cls>")
    has = cls_id is not None and len(tokens) > 0
    if has:
        ids, _, special = tokens.cell(0)
        has = bool(np.any(special & (ids == cls_id)))
    if not has:
        raise InputError(f"sae.hook_point=cls: this {adapter.family} model's input cells have no <cls> token; "
                         "use sae.hook_point=cell_mean (the mean over the cell's gene tokens) or tokens.")
    return int(cls_id)


def cell_vectors(h: torch.Tensor, batch: Batch, hook: str, cls_id: int | None = None) -> torch.Tensor:
    """One float32 vector per cell of ``batch`` from its activations ``h`` [B, T, d] -> [B, d]:
    ``cell_mean`` = the mean over the cell's gene tokens (0 for a cell without any), ``cls`` = the
    state at its ``<cls>`` token (``cls_token_id``)."""
    if hook == "cell_mean":
        mask = batch.gene_mask.to(h.device)
        return (h.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    if hook != "cls":
        raise ValueError(f"{hook!r} is not a cell-level hook point ({', '.join(CELL_HOOK_POINTS)})")
    is_cls = ((batch.gene_ids == cls_id) & ~batch.padding_mask).to(h.device)
    if not bool((is_cls.sum(1) == 1).all()):
        raise InputError("sae.hook_point=cls: some cells do not have exactly one <cls> token; "
                         "use sae.hook_point=cell_mean.")
    return h[is_cls].float()


def store_name(layer: int, hook: str = "tokens") -> str:
    """The folder of one layer's store: ``layer_<l>`` (tokens), ``<hook>_<l>`` (one row per cell)."""
    return f"layer_{layer}" if hook == "tokens" else f"{hook}_{layer}"


@torch.inference_mode()
def extract_activations(adapter: ScFMAdapter, tokens: TokenizedCells, layers: list[int], out_dir: str | Path, *,
                        batch_size: int = 32, shard_tokens: int = 65536, dtype: str = "float32",
                        include_special: bool = False, desc: str = "extracting",
                        hook: str = "tokens") -> dict[int, ActivationStore]:
    """Run the model over ``tokens`` once and store the residual stream of every layer in
    ``layers`` under ``out_dir/<store_name(l, hook)>``. ``hook=tokens``: one row per gene token,
    special tokens too with ``include_special`` (padding is never stored); a cell-level ``hook``
    (``CELL_HOOK_POINTS``): one row per cell, ``cell_vectors`` (gene = -1). Finished stores are
    reused as they are."""
    out_dir = Path(out_dir)
    stores = {layer: out_dir / store_name(layer, hook) for layer in layers}
    cls_id = cls_token_id(adapter, tokens) if hook == "cls" else None
    todo = [layer for layer, path in stores.items() if not (path / "meta.json").is_file()]
    if todo:
        writers = {}
        for layer in todo:
            partial = stores[layer].with_name(stores[layer].name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            writers[layer] = _ShardWriter(partial, layer, adapter.d_model, dtype, shard_tokens, include_special, hook)
        with tqdm(total=len(tokens), desc=desc, unit="cell") as bar:
            for batch in tokens.batches(adapter.cells_per_batch(batch_size)):
                hidden = adapter.capture(batch, todo)
                if hook != "tokens":
                    cell = batch.cell_index.to(adapter.device)
                    for layer in todo:
                        writers[layer].add(cell_vectors(hidden[layer], batch, hook, cls_id), cell,
                                           torch.full_like(cell, -1), torch.zeros_like(cell, dtype=torch.bool))
                    bar.update(len(batch.cell_index))
                    continue
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
                      layers: list[int], hook: str | None = None) -> dict[str, dict[int, ActivationStore]]:
    """{"train"|"eval": {layer: store}}, extracted once and cached under a key of everything
    that determines them (model, data, layers' storage settings, package version); rows as
    ``hook`` (default ``cfg.sae.hook_point``: tokens, or one row per cell)."""
    hook = sae_hook_point(cfg.sae) if hook is None else hook
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
            desc=f"extracting {split} activations", hook=hook,
        )
    return stores
