"""Extraction: run a model over tokenized cells once and write the hooked activations of each
layer into a sharded store (``store.shards``): one row per gene token (``sae.hook_point=tokens``,
the default) or one row per cell (``CELL_HOOK_POINTS``: the cell's vector, ``cell_vectors``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
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


def extraction_plan(rows_per_cell: np.ndarray, cells_per_batch: int, shard_tokens: int,
                    seed: int) -> list[list[np.ndarray]]:
    """Shards -> batches -> cell positions, a pure function of its arguments (so every rank, and a
    rerun after a kill, computes the same plan). Cells in one seeded permutation are sorted by
    length (stable) and cut into batches of ``cells_per_batch`` similar lengths; the batch order is
    shuffled by ``seed`` and consecutive batches form a shard once they hold >= ``shard_tokens``
    rows (``rows_per_cell`` [n_cells]: stored rows of each cell)."""
    n = len(rows_per_cell)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    order = perm[np.argsort(rows_per_cell[perm], kind="stable")]
    batches = [order[i:i + cells_per_batch] for i in range(0, n, cells_per_batch)]
    batches = [batches[j] for j in rng.permutation(len(batches))]
    shards, current, rows = [], [], 0
    for b in batches:
        current.append(b)
        rows += int(rows_per_cell[b].sum())
        if rows >= shard_tokens:
            shards.append(current)
            current, rows = [], 0
    return shards + [current] if current else shards


class _Collate:
    """DataLoader ``collate_fn``: a list of cell positions -> ``tokens.collate`` (a padded Batch);
    a class, not a closure, so DataLoader workers can receive it."""

    def __init__(self, tokens: TokenizedCells):
        self.tokens = tokens

    def __call__(self, cells: list[int]) -> Batch:
        return self.tokens.collate(np.asarray(cells, dtype=np.int64))


def _sleep_after_shard(shard: int) -> None:
    """Test hook for kill-and-resume tests: ``SAE4SCFM_SLEEP_AFTER_SHARD=<n>`` sleeps 60 s after
    shard n is written, so a test can SIGKILL the process mid-extraction."""
    if os.environ.get("SAE4SCFM_SLEEP_AFTER_SHARD") == str(shard):
        time.sleep(60)


def extract_activations(adapter: ScFMAdapter, tokens: TokenizedCells, layers: list[int], out_dir: str | Path, *,
                        batch_size: int = 32, shard_tokens: int = 65536, dtype: str = "float32",
                        include_special: bool = False, desc: str = "extracting",
                        hook: str = "tokens", seed: int = 0, num_workers: int = 0) -> dict[int, ActivationStore]:
    """Run the model over ``tokens`` once and store the residual stream of every layer in
    ``layers`` under ``out_dir/<store_name(l, hook)>``. ``hook=tokens``: one row per gene token,
    special tokens too with ``include_special`` (padding is never stored); a cell-level ``hook``
    (``CELL_HOOK_POINTS``): one row per cell, ``cell_vectors`` (gene = -1). Finished stores are
    reused as they are.

    Batches and shards follow ``extraction_plan`` (``seed``); a DataLoader with ``num_workers``
    processes collates batches while the model runs (0: in this process). Resumable: each shard of
    each layer is written under a temp name and renamed, so a file under its final name in
    ``<store>.partial/`` is a finished shard, and a rerun (after a kill) computes only the missing
    ones; the store equals an uninterrupted run's (byte-identical in float32 on CPU). Under torchrun
    rank r computes shards r, r + W, ... and rank 0 writes ``meta.json`` (the manifest) once all
    ranks are done."""
    from sae4scfm.training.distributed import barrier, ranks  # training imports this module

    r = ranks(str(adapter.device))
    out_dir = Path(out_dir)
    stores = {layer: out_dir / store_name(layer, hook) for layer in layers}
    cls_id = cls_token_id(adapter, tokens) if hook == "cls" else None
    todo = [layer for layer, path in stores.items() if not (path / "meta.json").is_file()]
    if not todo:
        return {layer: ActivationStore(path) for layer, path in stores.items()}
    if r.world > len(tokens):
        raise InputError(f"torchrun world size {r.world} exceeds the {len(tokens)} cells to extract; "
                         f"run with --nproc_per_node (x nodes) <= {len(tokens)} or select more cells.")
    # shard boundaries count every token of a cell (special ones too), or one row per cell
    rows_per_cell = np.asarray(tokens.lengths) if hook == "tokens" else np.ones(len(tokens), dtype=np.int64)
    plan = extraction_plan(rows_per_cell, adapter.cells_per_batch(batch_size), shard_tokens, seed)
    plan_id = hashlib.sha256(b"".join(c.astype(np.int64).tobytes() + b"|" for s in plan for c in s)).hexdigest()
    writers = {layer: _ShardWriter(stores[layer].with_name(stores[layer].name + ".partial"), layer,
                                   adapter.d_model, dtype, 0, include_special, hook, plan_id, r.is_main)
               for layer in todo}
    barrier()  # rank 0 has (re)started the partial folders
    mine = [s for s in range(r.rank, len(plan), r.world) if not all(w.has(s) for w in writers.values())]
    batches = [b for s in mine for b in plan[s]]
    loader = torch.utils.data.DataLoader(np.arange(len(tokens)), batch_sampler=batches, collate_fn=_Collate(tokens),
                                         num_workers=num_workers)
    ends = dict(zip(np.cumsum([len(plan[s]) for s in mine]) - 1, mine))  # last batch index -> shard
    with tqdm(total=sum(len(c) for s in mine for c in plan[s]), desc=desc, unit="cell",
              disable=not r.is_main) as bar, torch.inference_mode():
        for i, batch in enumerate(loader):
            hidden = adapter.capture(batch, todo)
            if hook != "tokens":
                cell = batch.cell_index.to(adapter.device)
                for layer in todo:
                    writers[layer].add(cell_vectors(hidden[layer], batch, hook, cls_id), cell,
                                       torch.full_like(cell, -1), torch.zeros_like(cell, dtype=torch.bool))
            else:
                keep = (batch.gene_mask | (~batch.padding_mask if include_special else batch.gene_mask)).to(adapter.device)
                cell = batch.cell_index[:, None].expand_as(batch.gene_ids).to(adapter.device)[keep]
                gene = batch.gene_ids.to(adapter.device)[keep]
                special = ~batch.gene_mask.to(adapter.device)[keep]
                for layer in todo:
                    writers[layer].add(hidden[layer][keep], cell, gene, special)
            bar.update(len(batch.cell_index))
            if i in ends:
                for layer in todo:
                    writers[layer].write(ends[i])
                _sleep_after_shard(ends[i])
    barrier()  # every rank's shards are on disk
    if r.is_main:
        for layer in todo:
            writers[layer].close(len(tokens), len(plan))
            shutil.rmtree(stores[layer], ignore_errors=True)
            writers[layer].root.rename(stores[layer])
    barrier()
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
            desc=f"extracting {split} activations", hook=hook, seed=int(cfg.seed),
            num_workers=int(cfg.buffer.get("extract_workers", 0)),
        )
    return stores
