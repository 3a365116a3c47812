"""Trajectory steering on Kang 2018 with the demo scGPT: do the features chosen on train cells (largest |Spearman
ρ| with diffusion pseudotime) move held-out early cells toward the late end more than density-matched random
features?

Trains the default SAE on ``data=kang`` (``--cells`` cells; or takes ``--run``), then for each transition
(CTRL → STIM on ``stim``; CD14 Mono → CD16 Mono on ``seurat_annotations``) runs ``steer_trajectory`` and prints:
the pseudotime's agreement with the labels (held-out AUROC of pseudotime for last vs first value), the chosen
features' ρ on train and eval cells, and per α the four scores (signature_r, progress, closer_fraction,
emb_closer_fraction) of each feature and of the set, against their matched null (mean, empirical p, BH q).

    python benchmarks/trajectory.py [--run runs/E/T] [--cells 3000] [--steer-cells 50] [--null 10]
        [--output mvc|mlm] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

import sae4scfm
from sae4scfm.causal.run import open_causal_run
from sae4scfm.causal.trajectory import METRICS, steer_trajectory

TRANSITIONS = [("stim", ["CTRL", "STIM"]), ("seurat_annotations", ["CD14 Mono", "CD16 Mono"])]


def train(cells: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="sae4scfm-trajectory-bench-"))
    cfg = sae4scfm.compose("train", ["scfm=demo", "data=kang", f"data.n_cells={cells}", "seed=0", "wandb.mode=disabled",
                                     f"runs_dir={root}", "experiment=trajectory"])
    run_dir = Path(sae4scfm.train(cfg))
    sae4scfm.generate_features(sae4scfm.compose("features", address(run_dir)))
    return run_dir


def address(run_dir: Path) -> list[str]:
    return [f"runs_dir={run_dir.parent.parent}", f"sae_checkpoint.experiment={run_dir.parent.name}",
            f"sae_checkpoint.timestamp={run_dir.name}"]


def report(run_dir: Path, key: str, lineage: list[str], summary: pd.DataFrame) -> None:
    out = run_dir / "causal" / "trajectory"
    pt = pd.read_csv(out / "pseudotime.csv")
    ev = pt[(pt["split"] == "eval") & np.isfinite(pt["pseudotime"]) & pt["label"].isin([lineage[0], lineage[-1]])]
    auroc = roc_auc_score(ev["label"] == lineage[-1], ev["pseudotime"])
    med = pt.groupby("label")["pseudotime"].median()
    print(f"\n## {key}: {' -> '.join(lineage)}  ({len(pt)} cells, {int(pt['steered'].sum())} early eval cells steered)")
    print(f"pseudotime: median {', '.join(f'{v} {med[v]:.3f}' for v in lineage)}; held-out AUROC "
          f"(pseudotime, {lineage[-1]} vs {lineage[0]}) {auroc:.3f}")
    feats = summary.drop_duplicates("target")
    print("features (rho with pseudotime, train / eval): "
          + ", ".join(f"{t} {r:+.3f}/{e:+.3f}" for t, r, e in zip(feats["target"], feats["rho_train"], feats["rho_eval"])))
    sets = pd.read_csv(out / "set.csv")
    for a in sorted(summary["alpha"].unique()):
        print(f"alpha {a:+g} (aims {'late' if a >= 0 else 'early'}):")
        rows = [("features (mean)", summary[summary["alpha"] == a]), ("set", sets[sets["alpha"] == a])]
        for name, g in rows:
            cells = []
            for m in METRICS:
                cells.append(f"{m} {g[m].mean():.3f} vs null {g[f'{m}_null_mean'].mean():.3f} "
                             f"(p {g[f'{m}_p'].median():.3f}, q<0.05: {int((g[f'{m}_q'] < 0.05).sum())}/{len(g)})")
            print(f"  {name:16s} " + "; ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained data=kang token-SAE run dir with features (default: train one)")
    ap.add_argument("--cells", type=int, default=3000, help="Kang cells when training")
    ap.add_argument("--steer-cells", type=int, default=50, help="trajectory.n_cells")
    ap.add_argument("--null", type=int, default=10, help="trajectory.null_features")
    ap.add_argument("--features", type=int, default=5, help="trajectory.n_features")
    ap.add_argument("--output", default=None, help="trajectory.output (default: the stage's default readout)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run_dir = args.run or train(args.cells)
    print(f"run {run_dir} ({time.perf_counter() - t0:.0f} s)")
    cfg = sae4scfm.compose("trajectory", address(run_dir))
    ctx = open_causal_run(cfg, "trajectory benchmark")
    for key, lineage in TRANSITIONS:
        t1 = time.perf_counter()
        overrides = [f"trajectory.label_key={key}", f"trajectory.lineage=[{','.join(lineage)}]",
                     f"trajectory.n_cells={args.steer_cells}", f"trajectory.null_features={args.null}",
                     f"trajectory.n_features={args.features}"]
        if args.output:
            overrides.append(f"trajectory.output={args.output}")
        t = sae4scfm.compose("trajectory", [*address(run_dir), *overrides]).trajectory
        summary = steer_trajectory(ctx, t)
        report(run_dir, key, lineage, summary)
        print(f"({time.perf_counter() - t1:.0f} s)")


if __name__ == "__main__":
    main()
