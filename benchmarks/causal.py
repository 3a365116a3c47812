"""Causal toolkit speed and agreement, measured in one run on a trained SAE.

1. Exact ablation (the tracing inner loop): interventions/s with ``per_forward`` ablations stacked along the
   batch axis of one forward vs one ablation per forward (same cells, same features).
2. Attribution vs exhaustive exact ablation of every active feature: wall-time ratio and agreement
   (Spearman rho of per-feature effects, top-50 overlap) for ``grad`` and ``ig`` on two metrics.

    python benchmarks/causal.py                       # trains the small demo run first (data=pbmc, layer 2)
    python benchmarks/causal.py --run runs/E/T        # any trained token-SAE run of the demo or another model

Prints one table; the issue's targets are >= 20x (stacked vs loop) and >= 200x (attribution vs exact) at
Spearman >= 0.8. Stacking is the only speed-up measured here: the run-from-layer prefix cache is not built yet.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sae4scfm
from sae4scfm.causal.attribution import agreement, attribute, exact_ablation, mean_output, projection
from sae4scfm.causal.interventions import Intervention, latent_edit
from sae4scfm.data import load_dataset
from sae4scfm.runs import load_run_config
from sae4scfm.saes.base import load_sae
from sae4scfm.scfm import load_scfm
from sae4scfm.scfm.loading import split_tokens, tokenize_dataset

SMALL = ["scfm=demo", "data=pbmc", "sae=topk", "sae.target_layer=2", "sae.dictionary_multiplier=4",
         "sae.hyperparams.k=16", "seed=0", "data.n_cells=500", "wandb.mode=disabled"]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run dir (default: train the small demo run)")
    ap.add_argument("--cells", type=int, default=16, help="eval cells per measurement")
    ap.add_argument("--features", type=int, default=64, help="ablations timed in the loop vs stacked test")
    ap.add_argument("--per-forward", type=int, default=32, help="ablations stacked per forward")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = args.run
    if run_dir is None:
        root = Path(tempfile.mkdtemp(prefix="sae4scfm-causal-bench-"))
        run_dir = sae4scfm.train(sae4scfm.compose("train", [*SMALL, f"runs_dir={root}", "experiment=bench"]))
    cfg = load_run_config(run_dir)
    sae, sae_cfg = load_sae(run_dir)
    layer = int(sae_cfg["layer"])
    adapter = load_scfm(cfg.scfm)
    adata = load_dataset(cfg.data)
    tokens = split_tokens(tokenize_dataset(adapter, adata, cfg.data), adata, "eval")
    batch = tokens.collate(np.arange(min(args.cells, len(tokens))))
    with torch.no_grad():
        f = sae.encode(adapter.capture(batch, [layer])[layer][batch.gene_mask])
    active = torch.nonzero((f > 0).any(0)).flatten().numpy()
    chosen = active[: args.features]
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
    print(f"run {run_dir} layer {layer}, {len(batch.cell_index)} eval cells, {len(active)} active features "
          f"of {sae.d_sae}, {args.threads} threads")
    print(f"exact ablation: one per forward {len(chosen) / t_loop:.1f} interventions/s, stacked x{args.per_forward} "
          f"{len(chosen) / t_stacked:.1f} interventions/s: {t_loop / t_stacked:.1f}x (target >= 20x)")
    rows = []
    for name, m in (("cell embedding projection", metric), ("mean predicted expression (mvc)", mean_output("mvc"))):
        exact, t_exact = timed(lambda: exact_ablation(adapter, sae, layer, batch, m, active,
                                                      per_forward=args.per_forward).mean(0).numpy())
        for method in ("grad", "ig"):
            est, t_est = timed(lambda: attribute(adapter, sae, layer, batch, m, method=method).mean(0).numpy())
            score = agreement(est[active], exact)
            rows.append((name, method, score["spearman"], score["top50_overlap"], t_exact / t_est))
    print(f"attribution vs exhaustive exact ablation of all {len(active)} active features (target >= 200x at rho >= 0.8):")
    print(f"{'metric':34s} {'method':6s} {'spearman':>9s} {'top-50':>7s} {'speed-up':>9s}")
    for name, method, rho, top, speed in rows:
        print(f"{name:34s} {method:6s} {rho:9.3f} {top:7.2f} {speed:8.1f}x")


if __name__ == "__main__":
    main()
