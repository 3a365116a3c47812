"""Feature removal by selection -> integration benchmark: batch correction and bio conservation of the model's
cell embedding with the top-n batch features (selected on train cells) removed inside the model, against n
density-matched random features per seed, scored by scib-metrics on the held-out (eval) cells.

    python benchmarks/feature_removal.py                          # data=pbmc_batches (two PBMC experiments)
    python benchmarks/feature_removal.py --data kang --cells 1500 # data=kang with the condition (stim) as batch
    python benchmarks/feature_removal.py --run runs/E/T           # an existing run with features.h5ad

Trains the small demo run first (topk, layer 2, like the README's example) and writes its features. Prints the
integration table (rows: model_cell_emb, expression_pca, model_cell_emb_removed_n{n},
model_cell_emb_random_n{n}_s{seed}) and, per n, removed vs random (mean, sd, empirical p) of the aggregate
scores; the same files land in <run>/analysis/integration*.csv.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import sae4scfm
from sae4scfm.analysis.integration import REMOVAL_FILE, benchmark_integration

SMALL = ["scfm=demo", "sae=topk", "sae.target_layer=2", "sae.dictionary_multiplier=4", "sae.hyperparams.k=16",
         "sae.hyperparams.lr=3e-4", "seed=0", "wandb.mode=disabled"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run dir with features/features.h5ad (default: train one)")
    ap.add_argument("--data", default="pbmc_batches", choices=["pbmc_batches", "kang"])
    ap.add_argument("--cells", type=int, default=1200, help="cells of the dataset (20%% held out)")
    ap.add_argument("--n", default="8,32,128", help="feature counts removed")
    ap.add_argument("--seeds", default="0,1,2", help="random-feature control seeds")
    ap.add_argument("--selection", default="auroc", choices=["auroc", "auroc_over_cell_type"])
    ap.add_argument("--kbet", action="store_true", help="include kBET (about 1 min of numba compilation)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    run_dir = args.run
    if run_dir is None:
        root = Path(tempfile.mkdtemp(prefix="sae4scfm-removal-bench-"))
        run_dir = sae4scfm.train(sae4scfm.compose("train", [*SMALL, f"data={args.data}", f"data.n_cells={args.cells}",
                                                            f"runs_dir={root}", f"buffer.store_dir={root / 'stores'}",
                                                            "experiment=removal", "device=cpu"]))
        sae4scfm.generate_features(sae4scfm.compose("features", [
            f"runs_dir={root}", "sae_checkpoint.experiment=removal", f"sae_checkpoint.timestamp={run_dir.name}",
            "device=cpu", "features.token_features=false"]))
        print(f"trained and featurised {run_dir} in {time.perf_counter() - start:.0f} s", flush=True)
    overrides = [f"runs_dir={run_dir.parents[1]}", f"sae_checkpoint.experiment={run_dir.parent.name}",
                 f"sae_checkpoint.timestamp={run_dir.name}", "device=cpu",
                 "integration.embeddings=[model_cell_emb,expression_pca]", "integration.removal.enabled=true",
                 f"integration.removal.n_features_list=[{args.n}]", f"integration.removal.seeds=[{args.seeds}]",
                 f"integration.removal.selection={args.selection}"]
    if args.data == "kang":
        overrides.append("integration.batch_key=stim")
    if not args.kbet:
        overrides.append("integration.batch_correction.kbet_per_label=false")
    t0 = time.perf_counter()
    table = benchmark_integration(sae4scfm.compose("benchmark_integration", overrides))
    t_bench = time.perf_counter() - t0
    summary = pd.read_csv(run_dir / "analysis" / REMOVAL_FILE)
    agg = table.loc[:, ["Aggregate score"]].droplevel(0, axis=1)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        print("\n## scib aggregate scores (eval cells)\n")
        print(agg.round(3).to_string())
        print("\n## per-metric scores\n")
        print(table.drop(columns="Embedding", level=0).droplevel(0, axis=1).round(3).to_string())
        print("\n## removed vs density-matched random (p = (1 + #random >= removed) / (1 + #random))\n")
        print(summary.round(3).to_string(index=False))
    print(f"\nbenchmark {t_bench:.0f} s, total {time.perf_counter() - start:.0f} s, {args.threads} threads; run {run_dir}")


if __name__ == "__main__":
    main()
