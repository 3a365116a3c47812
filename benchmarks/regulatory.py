"""Regulatory probe on real data: does steering a TF's feature move the TF's MSigDB c3.tft targets more than matched
non-targets, and more than density-matched random features do?

Trains the default SAE on ``data=kang`` (``--n-cells`` cells, demo scGPT) and encodes its cells (or reuses
``--run``), then runs ``sae4scfm.causal.regulatory.regulatory_probe`` on the IFN TFs of ``--tfs`` that are in the
model's vocabulary plus the ``--n-other`` other c3.tft TFs with the most targets in it, and prints per TF and α:
target vs matched non-target mean |Δ|, the AUC with its BH q, the null features' mean AUC and the empirical p, then
a summary line.

    python benchmarks/regulatory.py [--run RUN_DIR] [--n-cells 3000] [--steer-cells 60] [--positions all|tf]
        [--select token|expression] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import sae4scfm

IFN_TFS = ["STAT1", "STAT2", "IRF1", "IRF2", "IRF7", "IRF8", "IRF9"]


def train_run(runs_dir: Path, n_cells: int) -> Path:
    cfg = sae4scfm.compose("train", ["data=kang", f"data.n_cells={n_cells}", "experiment=regulatory",
                                     f"runs_dir={runs_dir}", f"buffer.store_dir={runs_dir / 'stores'}",
                                     "wandb.mode=disabled"])
    run_dir = Path(sae4scfm.train(cfg))
    sae4scfm.generate_features(sae4scfm.compose("features", address(run_dir)))
    return run_dir


def address(run_dir: Path) -> list[str]:
    return [f"runs_dir={run_dir.parent.parent}", f"sae_checkpoint.experiment={run_dir.parent.name}",
            f"sae_checkpoint.timestamp={run_dir.name}"]


def pick_tfs(table: str, tfs: list[str], n_other: int) -> list[str]:
    """The ``tfs`` in the demo's vocabulary with >= 5 targets there, plus the ``n_other`` others with the most."""
    from sae4scfm.causal.regulatory import read_tf_table, restrict_to_vocab
    from sae4scfm.scfm.demo import SHIPPED

    vocab = set(json.loads((SHIPPED / "vocab.json").read_text()))
    counts = restrict_to_vocab(read_tf_table(table), vocab, table).groupby("tf").size()
    counts = counts[counts >= 5].sort_values(ascending=False, kind="stable")
    wanted = [t for t in tfs if t in counts.index]
    return wanted + [t for t in counts.index if t not in wanted][:n_other]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="an existing run dir (kang, features generated)")
    ap.add_argument("--runs-dir", type=Path)
    ap.add_argument("--n-cells", type=int, default=3000)
    ap.add_argument("--steer-cells", type=int, default=60)
    ap.add_argument("--null-features", type=int, default=8)
    ap.add_argument("--table", default="msigdb:c3.tft")
    ap.add_argument("--tfs", default=",".join(IFN_TFS))
    ap.add_argument("--n-other", type=int, default=6)
    ap.add_argument("--positions", default="all", help="regulatory.positions: all | firing | tf")
    ap.add_argument("--select", default="token", help="regulatory.select: token | expression")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from sae4scfm.causal.regulatory import regulatory_probe

    t0 = time.time()
    run_dir = args.run or train_run(args.runs_dir or Path(tempfile.mkdtemp(prefix="regulatory-")), args.n_cells)
    t1 = time.time()
    tfs = pick_tfs(args.table, args.tfs.split(","), args.n_other)
    cfg = sae4scfm.compose("regulate", [*address(run_dir), f"regulatory.table={args.table}",
                                        f"regulatory.tfs=[{','.join(tfs)}]", f"regulatory.n_cells={args.steer_cells}",
                                        f"regulatory.null_features={args.null_features}",
                                        f"regulatory.positions={args.positions}", f"regulatory.select={args.select}"])
    s = regulatory_probe(cfg)
    t2 = time.time()
    cols = ["tf", "alpha", "feature", "score", "n_targets", "n_matched", "target_shift", "matched_shift", "auc", "mw_q",
            "auc_null_mean", "auc_p", "auc_q", "target_shift_null_mean", "target_shift_p"]
    print(f"\nregulatory probe, {args.table}, run {run_dir}, {args.steer_cells} eval cells steered at positions="
          f"{args.positions}, features chosen by select={args.select}, {args.null_features} density-matched null features per TF feature")
    print(s[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    ifn = s[s["tf"].isin(IFN_TFS)]
    for name, part in [("all TFs", s), ("IFN TFs", ifn)]:
        if len(part):
            print(f"{name}: {part['tf'].nunique()} TFs x {part['alpha'].nunique()} alphas; median AUC targets vs matched "
                  f"{part['auc'].median():.3f} (null features {part['auc_null_mean'].median():.3f}); "
                  f"mw_q < 0.05: {int((part['mw_q'] < 0.05).sum())}/{len(part)}; "
                  f"AUC above the null (empirical p < 0.05): {int((part['auc_p'] < 0.05).sum())}/{len(part)}; "
                  f"target |shift| / matched |shift| median {np.median(part['target_shift'] / part['matched_shift']):.3f}")
    print(f"time: run {t1 - t0:.0f} s, probe {t2 - t1:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"run": str(run_dir), "tfs": tfs, "rows": s.to_dict("records"),
                                        "seconds": {"run": t1 - t0, "probe": t2 - t1}}, default=str, indent=1))


if __name__ == "__main__":
    main()
