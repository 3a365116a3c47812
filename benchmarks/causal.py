"""Causal toolkit speed and agreement, measured in one run on trained SAEs.

1. Exact circuit tracing (``tracing.edge_deltas``: every source feature zero-ablated, the change of every
   downstream SAE feature per cell): interventions/s batched (``per_forward`` features × the cells where each
   fires stacked along the batch axis, every forward starting from the cached clean state at the source layer,
   the SAE code of that state encoded once, the forward stopped at the last target layer) vs the published way,
   one intervention per full forward: (a) one feature over all the batch's cells per forward, (b) one feature in
   one cell per forward. An intervention is one (feature, cell) ablation; every method computes the same table
   (checked).
2. Exact ablation on a metric of the model's outputs (the cell embedding: the forward runs to the end): batched
   vs one feature per full forward.
3. Attribution vs exhaustive exact ablation of every active feature: wall-time ratio and agreement (Spearman ρ
   of per-feature effects, top-50 overlap) for ``grad`` and ``ig`` on two metrics.

    python benchmarks/causal.py                          # trains the small demo runs (data=pbmc, layers 2 and 3)
    python benchmarks/causal.py --run runs/E/T --target runs/E3/T3   # a source run and a downstream run
    python benchmarks/causal.py --dictionary-multiplier 16           # d_sae 2,048 instead of 512

The issue's targets: >= 20x (batched vs one per forward) and >= 200x (attribution vs exact) at the reported
Spearman (>= 0.8 at the default layer).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sae4scfm
from sae4scfm.causal.attribution import agreement, attribute, exact_ablation, mean_output, projection
from sae4scfm.causal.interventions import Intervention, latent_edit
from sae4scfm.causal.tracing import edge_deltas, pooled_codes
from sae4scfm.data import load_dataset
from sae4scfm.runs import load_run_config
from sae4scfm.saes.base import load_sae
from sae4scfm.scfm import load_scfm
from sae4scfm.scfm.hooks import acting
from sae4scfm.scfm.loading import split_tokens, tokenize_dataset

SMALL = ["scfm=demo", "data=pbmc", "sae=topk", "sae.target_layer=2", "sae.dictionary_multiplier=4",
         "sae.hyperparams.k=16", "seed=0", "data.n_cells=500", "wandb.mode=disabled"]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def train_small(root: Path, layer: int, multiplier: int = 4) -> Path:
    overrides = [o for o in SMALL if not o.startswith(("sae.target_layer", "sae.dictionary_multiplier"))]
    return sae4scfm.train(sae4scfm.compose("train", [*overrides, f"sae.target_layer={layer}",
                                                     f"sae.dictionary_multiplier={multiplier}", f"runs_dir={root}",
                                                     f"experiment=bench{layer}"]))


@torch.no_grad()
def published_trace(adapter, source, layer, targets, batch, features, pool="mean"):
    """Δ [F, B, d_sae] per target layer, the published way: per source feature one full forward of the batch
    with the ablation, the target layers recorded on the way (no early stop), their SAEs encoded after."""
    def full_capture(b):
        seen = {}
        with acting(adapter.hook_points[f"resid.{targets_layer}"], lambda x, _m: seen.setdefault("h", x)):
            adapter.run(b)
        return seen["h"]

    (targets_layer, target), = targets.items()
    clean = pooled_codes(full_capture(batch), batch.gene_mask, target, pool)
    out = []
    for j in features:
        with adapter.intervene(layer, latent_edit(source, [Intervention((int(j),), "zero")])):
            out.append(pooled_codes(full_capture(batch), batch.gene_mask, target, pool) - clean)
    return torch.stack(out).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run dir (default: train the small demo run, layer 2)")
    ap.add_argument("--target", type=Path, help="a run of the same model at a deeper layer, the tracing target "
                                                "(default: train the small demo run at the next layer)")
    ap.add_argument("--cells", type=int, default=16, help="eval cells per measurement")
    ap.add_argument("--features", type=int, default=64, help="source features timed in the loop vs batched tests")
    ap.add_argument("--cell-loop-features", type=int, default=8, help="features timed one cell per forward")
    ap.add_argument("--per-forward", type=int, default=32, help="features stacked per forward (x their cells)")
    ap.add_argument("--dictionary-multiplier", type=int, default=4,
                    help="d_sae / d_model of the trained runs (the attribution speed-up grows with the active features)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="sae4scfm-causal-bench-"))
    run_dir = args.run or train_small(root, 2, args.dictionary_multiplier)
    cfg = load_run_config(run_dir)
    sae, sae_cfg = load_sae(run_dir)
    layer = int(sae_cfg["layer"])
    target_dir = args.target or train_small(root, layer + 1, args.dictionary_multiplier)
    target, target_cfg = load_sae(target_dir)
    target_layer = int(target_cfg["layer"])
    adapter = load_scfm(cfg.scfm)
    adata = load_dataset(cfg.data)
    tokens = split_tokens(tokenize_dataset(adapter, adata, cfg.data), adata, "eval")
    batch = tokens.collate(np.arange(min(args.cells, len(tokens))))
    B = len(batch.cell_index)
    with torch.no_grad():
        h = adapter.capture(batch, [layer])[layer]
        f = sae.encode(h[batch.gene_mask])
    active = torch.nonzero((f > 0).any(0)).flatten().numpy()
    rows = torch.nonzero(batch.gene_mask, as_tuple=True)[0]
    fires = torch.zeros(B, sae.d_sae).index_add_(0, rows, (f > 0).float()) > 0
    chosen = active[: args.features]
    load0 = os.getloadavg()[0]
    print(f"run {run_dir} layer {layer} -> target {target_dir} layer {target_layer} of {adapter.n_layers}; "
          f"{B} eval cells, {int(batch.gene_mask.sum(1).float().mean())} gene tokens per cell; {len(active)} "
          f"active features of {sae.d_sae}, each firing in {fires[:, active].float().mean():.0%} of the cells on "
          f"average; {args.threads} threads, load average {load0:.1f}")

    # 1. exact tracing
    targets = {target_layer: target}
    want, t_loop = timed(lambda: published_trace(adapter, sae, layer, targets, batch, chosen))
    got, t_batched = timed(lambda: edge_deltas(adapter, sae, layer, targets, batch, chosen,
                                               per_forward=args.per_forward)[target_layer])
    np.testing.assert_allclose(got, want, atol=1e-4, err_msg="batched tracing differs from one ablation per forward")
    cell_features = chosen[: args.cell_loop_features]

    def per_cell_loop():  # each cell collated alone: no padding
        return np.stack([published_trace(adapter, sae, layer, targets, tokens.collate(np.array([c])),
                                         cell_features)[:, 0] for c in range(B)], 1)

    want_cells, t_cells = timed(per_cell_loop)
    # an unpadded cell's forward differs in the last float bits, which can swap a TopK target's k-th feature
    off = np.abs(got[: len(cell_features)] - want_cells) > 1e-4
    assert off.mean() < 1e-3, f"batched tracing differs from one cell per forward at {off.mean():.2%} of edges"
    n = len(chosen) * B
    rate_batched = n / t_batched
    rate_loop = n / t_loop
    rate_cells = len(cell_features) * B / t_cells
    print(f"exact tracing layer {layer} -> {target_layer} (interventions = feature x cell ablations, all "
          f"{len(chosen)} x {B} computed):")
    print(f"  one feature x {B} cells per full forward   {rate_loop:9.1f} interventions/s")
    print(f"  one feature x 1 cell per full forward     {rate_cells:9.1f} interventions/s")
    print(f"  batched x{args.per_forward} features, cached prefix   {rate_batched:9.1f} interventions/s: "
          f"{rate_batched / rate_loop:.1f}x vs {B} cells per forward, {rate_batched / rate_cells:.1f}x vs 1 cell "
          f"per forward (target >= 20x); {off.sum()} of {off.size} edges of the unpadded one-cell forwards differ "
          "> 1e-4 (a TopK target's k-th feature swapped by float rounding)")

    # 2. exact ablation on the cell embedding
    metric = projection("cell_emb", torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0)))

    @torch.no_grad()
    def loop():
        clean = metric(adapter.run(batch))
        out = []
        for j in chosen:
            with adapter.intervene(layer, latent_edit(sae, [Intervention((int(j),), "zero")])):
                out.append(metric(adapter.run(batch)) - clean)
        return torch.stack(out, 1)

    exact_loop, t_loop = timed(loop)
    exact_stacked, t_stacked = timed(lambda: exact_ablation(adapter, sae, layer, batch, metric, chosen,
                                                            per_forward=args.per_forward))
    assert torch.allclose(exact_loop, exact_stacked, atol=1e-4), "stacked ablations differ from one at a time"
    print(f"exact ablation, cell-embedding metric (forward to the end): one feature per forward "
          f"{n / t_loop:.1f} interventions/s, batched {n / t_stacked:.1f}: {t_loop / t_stacked:.1f}x")

    # 3. attribution vs exhaustive exact ablation
    rows = []
    for name, m in (("cell embedding projection", metric), ("mean predicted expression (mvc)", mean_output("mvc"))):
        exact, t_exact = timed(lambda: exact_ablation(adapter, sae, layer, batch, m, active,
                                                      per_forward=args.per_forward).mean(0).numpy())
        for method in ("grad", "ig"):
            est, t_est = timed(lambda: attribute(adapter, sae, layer, batch, m, method=method).mean(0).numpy())
            score = agreement(est[active], exact)
            rows.append((name, method, score["spearman"], score["top50_overlap"], t_exact, t_est))
    print(f"attribution vs exhaustive exact ablation of all {len(active)} active features (target >= 200x):")
    print(f"{'metric':34s} {'method':6s} {'spearman':>9s} {'top-50':>7s} {'exact s':>8s} {'attr s':>7s} {'speed-up':>9s}")
    for name, method, rho, top, t_exact, t_est in rows:
        print(f"{name:34s} {method:6s} {rho:9.3f} {top:7.2f} {t_exact:8.1f} {t_est:7.2f} {t_exact / t_est:8.1f}x")
    print(f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
