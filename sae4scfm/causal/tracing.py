"""Circuit tracing: how ablating each active feature of a source-layer SAE changes the features of
SAEs at downstream layers, edge by edge, with a null; and higher-order (pair, triplet) ablations.

Edge i → (l, j): Δ_c = f_j^{(l)}(cell c, source i ablated) − f_j^{(l)}(cell c, clean), each cell's target
activation pooled over its gene tokens (``pool``: mean or max), ablation in ``error_preserving`` mode at every
gene token of the source layer. Per edge, over the cells:

- ``effect``: the mean Δ; ``effect_size``: mean / sd (Cohen's d of the paired change);
- ``consistency``: among the cells where the target CHANGED (|Δ| > ``tol``), the fraction whose change has the
  sign of the mean. Cells where the target is silent in both runs (Δ = 0 exactly) are not evidence either way:
  counting them as negative, as the published tracing code does, makes every negative effect on a mostly-silent
  target look consistent and rejects every positive one;
- ``p``: a sign-flip permutation test of the mean Δ (``n_perm`` random sign vectors, two-sided, (1 + #)/(1 + n));
  ``q``: BH over every edge tested.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sae4scfm.analysis.primitives import bh_fdr
from sae4scfm.atomic import atomic_write, atomic_write_json
from sae4scfm.causal.interventions import Intervention, ablation_runs, latent_edit, stack_batch
from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.tokens import Batch

POOLS = ("mean", "max")


def pooled_codes(h: torch.Tensor, gene_mask: torch.Tensor, sae: SAE, pool: str = "mean") -> torch.Tensor:
    """Each cell's SAE code pooled over its gene tokens: h [B, T, d] -> [B, d_sae]. A TopK SAE's k active
    latents per token are pooled directly (no dense [tokens, d_sae] code)."""
    if pool not in POOLS:
        raise InputError(f"tracing pool={pool!r} is unknown; use one of {', '.join(POOLS)}.")
    rows = torch.nonzero(gene_mask, as_tuple=True)[0].to(h.device)
    x = h[gene_mask.to(h.device)].float()
    B, d_sae = h.shape[0], sae.d_sae
    if hasattr(sae, "topk"):
        values, indices = sae.topk(x)  # [N, k]
        values, index = values.flatten(), (rows[:, None] * d_sae + indices).flatten()
        flat = torch.zeros(B * d_sae, device=x.device)
        if pool == "max":
            return flat.scatter_reduce_(0, index, values, "amax", include_self=True).view(B, d_sae)
        total = flat.index_add_(0, index, values).view(B, d_sae)
    else:
        f = sae.encode(x)
        if pool == "max":
            out = torch.zeros(B, d_sae, device=f.device)
            return out.scatter_reduce_(0, rows[:, None].expand_as(f), f, "amax", include_self=True)
        total = torch.zeros(B, d_sae, device=f.device).index_add_(0, rows, f)
    return total / gene_mask.sum(1, keepdim=True).clamp(min=1).to(total.device)


@torch.no_grad()
def edge_deltas(adapter: ScFMAdapter, source: SAE, source_layer: int, targets: dict[int, SAE], batch: Batch,
                features: Sequence[int], *, pool: str = "mean", per_forward: int = 16) -> dict[int, np.ndarray]:
    """{target layer: Δ [len(features), B, d_sae of that layer]}: the change of each cell's pooled target
    code when each source feature is zero-ablated (``ablation_runs``: ``per_forward`` ablations × the cells
    where each fires stacked per forward, from the cached clean state at the source layer, the forward stopped
    at the last target layer; cells where the source feature is silent have Δ = 0 exactly)."""
    batch = batch.to(adapter.device)
    layers = sorted(targets)
    if any(layer <= source_layer for layer in layers):
        raise InputError(f"tracing: target layers {layers} must be downstream of the source layer {source_layer}.")
    clean_h = adapter.capture(batch, [source_layer, *layers])
    clean = {layer: pooled_codes(clean_h[layer], batch.gene_mask, targets[layer], pool) for layer in layers}
    out = {layer: np.zeros((len(features), len(batch.cell_index), targets[layer].d_sae), dtype=np.float32)
           for layer in layers}
    for fi, ci, h in ablation_runs(adapter, source, source_layer, batch, features,
                                   lambda stacked: adapter.capture(stacked, layers), per_forward=per_forward,
                                   clean_h=clean_h[source_layer]):
        mask = batch.gene_mask.to(h[layers[0]].device)[ci.to(batch.gene_mask.device)]
        for layer in layers:
            codes = pooled_codes(h[layer], mask, targets[layer], pool)
            out[layer][fi.numpy(), ci.numpy()] = (codes - clean[layer][ci.to(codes.device)]).cpu().numpy()
    return out


def edge_statistics(delta: np.ndarray, *, tol: float = 1e-6, n_perm: int = 1000,
                    rng: np.random.Generator | None = None) -> pd.DataFrame:
    """Per-edge statistics of one source feature's changes ``delta`` [n_cells, n_targets]: rows target,
    n_changed, effect, effect_size, consistency, p (sign-flip permutation, two-sided). Targets that changed
    in no cell are left out."""
    rng = rng or np.random.default_rng(0)
    changed = np.abs(delta) > tol
    keep = np.flatnonzero(changed.any(0))
    d, ch = delta[:, keep], changed[:, keep]
    n = d.shape[0]
    mean = d.mean(0)
    sd = d.std(0, ddof=1) if n > 1 else np.zeros_like(mean)
    sign = np.sign(mean)
    agree = ((np.sign(d) == sign) & ch).sum(0)
    consistency = agree / ch.sum(0)
    flips = rng.choice([-1.0, 1.0], size=(n_perm, n))
    null = np.abs(flips @ d) / n  # [n_perm, targets]
    p = (1 + (null >= np.abs(mean) - 1e-12).sum(0)) / (1 + n_perm)
    with np.errstate(divide="ignore", invalid="ignore"):
        size = np.where(sd > 0, mean / sd, 0.0)
    return pd.DataFrame({"target": keep, "n_changed": ch.sum(0), "effect": mean, "effect_size": size,
                         "consistency": consistency, "p": p})


def trace_circuit(adapter: ScFMAdapter, source: SAE, source_layer: int, targets: dict[int, SAE], batch: Batch,
                  out_dir: Path, *, features: Sequence[int] | None = None, pool: str = "mean", n_perm: int = 1000,
                  per_forward: int = 16, chunk: int = 64, seed: int = 0) -> pd.DataFrame:
    """Every active source feature (fires on some gene token of ``batch``; or ``features``) → every target
    feature of every downstream SAE: the edge table (source, target_layer, target, n_changed, effect,
    effect_size, consistency, p, q), written to ``out_dir/edges.csv`` with ``hubs.csv`` (in/out degree of
    significant edges). Resumable: sources are traced ``chunk`` at a time into ``out_dir/parts/`` and a
    rerun skips finished parts; the settings are recorded in ``out_dir/trace.json`` and must match."""
    out_dir = Path(out_dir)
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    batch = batch.to(adapter.device)
    if features is None:
        with torch.no_grad():
            h = adapter.capture(batch, [source_layer])[source_layer]
            f = source.encode(h[batch.gene_mask].float())
        features = torch.nonzero((f > 0).any(0)).flatten().tolist()
    features = [int(j) for j in features]
    settings = {"source_layer": source_layer, "target_layers": sorted(targets), "pool": pool, "n_perm": n_perm,
                "seed": seed, "chunk": chunk, "n_cells": len(batch.cell_index), "features": features}
    record = out_dir / "trace.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        raise InputError(f"{record}: an unfinished trace with other settings is here; use another output dir or "
                         "delete it.")
    atomic_write_json(record, settings)
    starts = range(0, len(features), chunk)
    for start in tqdm(starts, desc="tracing", unit="chunk"):
        path = parts / f"sources_{start:07d}.csv"
        if path.is_file():
            continue
        block = features[start:start + chunk]
        deltas = edge_deltas(adapter, source, source_layer, targets, batch, block, pool=pool, per_forward=per_forward)
        rows = []
        for layer, d in deltas.items():
            for i, j in enumerate(block):
                rng = np.random.default_rng([seed, j, layer])
                stats = edge_statistics(d[i], n_perm=n_perm, rng=rng)
                rows.append(stats.assign(source=j, target_layer=layer))
        table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
        atomic_write(path, lambda p, t=table: t.to_csv(p, index=False))
    edges = pd.concat([pd.read_csv(parts / f"sources_{s:07d}.csv") for s in starts], ignore_index=True)
    if len(edges):
        edges["q"] = bh_fdr(edges["p"].to_numpy())
        edges = edges[["source", "target_layer", "target", "n_changed", "effect", "effect_size", "consistency",
                       "p", "q"]]
    atomic_write(out_dir / "edges.csv", lambda p: edges.to_csv(p, index=False))
    atomic_write(out_dir / "hubs.csv", lambda p: hub_statistics(edges).to_csv(p, index=False))
    return edges


def hub_statistics(edges: pd.DataFrame, q: float = 0.05) -> pd.DataFrame:
    """Degree of every node in the significant edges (q < ``q``): rows layer, feature, role (source |
    target), degree — the degree distribution, hubs first."""
    if not len(edges):
        return pd.DataFrame(columns=["layer", "feature", "role", "degree"])
    sig = edges[edges["q"] < q]
    out_deg = sig.groupby("source").size().rename("degree").reset_index().rename(columns={"source": "feature"})
    out_deg["role"], out_deg["layer"] = "source", -1
    in_deg = sig.groupby(["target_layer", "target"]).size().rename("degree").reset_index()
    in_deg = in_deg.rename(columns={"target_layer": "layer", "target": "feature"})
    in_deg["role"] = "target"
    table = pd.concat([out_deg, in_deg], ignore_index=True)[["layer", "feature", "role", "degree"]]
    return table.sort_values("degree", ascending=False, kind="stable").reset_index(drop=True)


@torch.no_grad()
def higher_order_ablation(adapter: ScFMAdapter, sae: SAE, layer: int, batch: Batch, metric, features: Sequence[int],
                          *, order: int = 2, per_forward: int = 16) -> pd.DataFrame:
    """Ablate every set of ``order`` (2 or 3) of ``features`` jointly and every subset of it; per set, the
    joint effect on ``metric`` (mean over cells), the sum of single effects, the additivity ratio
    joint / Σ singles, and the inclusion–exclusion interaction term (pairs: E_AB − E_A − E_B; triplets:
    E_ABC − E_AB − E_AC − E_BC + E_A + E_B + E_C)."""
    if order not in (2, 3):
        raise InputError(f"higher-order ablation order={order}: use 2 (pairs) or 3 (triplets).")
    features = [int(j) for j in features]
    sets = [tuple(s) for k in range(1, order + 1) for s in combinations(features, k)]
    batch = batch.to(adapter.device)
    clean = metric(adapter.run(batch))
    effect = {}
    for start in range(0, len(sets), per_forward):
        chunk = sets[start:start + per_forward]
        stacked = stack_batch(batch, len(chunk))
        with adapter.intervene(layer, latent_edit(sae, [Intervention(s, "zero") for s in chunk])):
            m = metric(adapter.run(stacked)).reshape(len(chunk), -1)
        for s, v in zip(chunk, m):
            effect[s] = float((v - clean).mean())
    rows = []
    for s in combinations(features, order):
        singles = sum(effect[(j,)] for j in s)
        interaction = sum((-1) ** (order - len(sub)) * effect[sub]
                          for k in range(1, order + 1) for sub in combinations(s, k))
        rows.append({"features": " ".join(map(str, s)), "joint": effect[s], "sum_of_singles": singles,
                     "additivity": effect[s] / singles if singles else np.nan, "interaction": interaction})
    return pd.DataFrame(rows)


def trace_features(cfg) -> pd.DataFrame:
    """``scripts/trace_circuits.py``: trace the run ``sae_checkpoint`` (source layer) into the SAEs of the runs
    ``tracing.targets`` (``experiment/timestamp`` of the same model and data at deeper layers) on
    ``tracing.n_cells`` eval cells; writes ``<run>/causal/tracing/{edges.csv, hubs.csv, trace.json, parts/}``."""
    from sae4scfm.causal.run import open_causal_run
    from sae4scfm.runs import resolve_run_dir
    from sae4scfm.saes.base import load_sae

    t = cfg.tracing
    ctx = open_causal_run(cfg, "tracing")
    if not t.targets:
        raise InputError("tracing.targets is empty; give the downstream runs, e.g. tracing.targets=[demo/Jan29-10-00].")
    targets = {}
    for address in t.targets:
        experiment, _, stamp = str(address).partition("/")
        run_dir = resolve_run_dir(cfg.runs_dir, experiment, stamp or "latest")
        sae, sae_cfg = load_sae(run_dir, ctx.adapter.device)
        if sae_cfg["d_in"] != ctx.sae.d_in or sae_cfg.get("model") != ctx.run.sae_cfg.get("model"):
            raise InputError(f"tracing.targets: {run_dir} is an SAE of another model ({sae_cfg.get('model_family')}, "
                             f"d_in {sae_cfg['d_in']}); trace runs of the same model.")
        targets[int(sae_cfg["layer"])] = sae
    cells = ctx.eval_tokens(int(t.n_cells), np.random.default_rng(int(t.seed)))
    batch = cells.collate(np.arange(len(cells)))
    features = [int(j) for j in t.features] if t.features is not None else None
    edges = trace_circuit(ctx.adapter, ctx.sae, ctx.layer, targets, batch, ctx.run.run_dir / "causal" / "tracing",
                          features=features, pool=t.pool, n_perm=int(t.n_perm), per_forward=int(t.per_forward),
                          chunk=int(t.chunk), seed=int(t.seed))
    sig = edges[edges["q"] < float(t.fdr)] if len(edges) else edges
    print(f"{len(edges)} edges tested, {len(sig)} with q < {t.fdr}; wrote {ctx.run.run_dir}/causal/tracing/edges.csv")
    return edges
