"""Which cell representation gives which held-out numbers, for a model and its random-init twin.

For the model (``--scfm``, default the demo scGPT) and its ``scfm.random_init=true`` twin, at one
layer (default the last) of one data preset (default ``data=pbmc``), trains the small SAEs needed:

  token SAE (sae.hook_point=tokens)  -> max | mean of its token latents over the cell's gene tokens,
                                        sae_of_mean (it applied to the cell's mean residual vector)
  cell SAE  (sae.hook_point=cell_mean) -> its code of the cell's mean residual vector
  cell SAE  (sae.hook_point=cls)       -> its code of the cell's <cls> state (families that have one)

and prints one table, representation x model:

  fire/cell     mean number of features with a non-zero value per cell (of d_sae)
  eval AUROC    per cell type (``data.cell_type_key``, types with >= --min-cells train cells and
                both classes among eval cells): the feature with the best one-vs-rest AUROC on the
                run's TRAIN cells, its AUROC on the EVAL cells; averaged over types
  #types>=0.9   cell types whose selected feature reaches eval AUROC >= 0.9 (of the types scored)

Selection is sae4scfm's ``select_on_train`` (tests check it against sklearn).

    python benchmarks/cell_representations.py [--data pbmc] [--layer -1] [--scfm demo]
        [--token-epochs 3] [--cell-epochs 60] [--cell-batch 64] [--runs-dir DIR] [--out FILE.json]
        [extra Hydra overrides for every training run, e.g. data.n_cells=2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import sae4scfm
from sae4scfm.analysis.labels import select_on_train, train_mask
from sae4scfm.errors import InputError
from sae4scfm.features.generate import cell_representation


def score(features, name: str, label_key: str, min_cells: int) -> dict:
    X = cell_representation(features, name).tocsr()
    chosen = select_on_train(X, features.obs[label_key], train_mask(features.obs), min_cells=min_cells)
    per_type = dict(zip(chosen["label"].astype(str), chosen["eval_auroc"]))
    values = np.array(list(per_type.values()))
    return {"fire_per_cell": float(np.diff(X.indptr).mean()), "d_sae": int(X.shape[1]),
            "eval_auroc_mean": float(values.mean()), "n_types_ge_0.9": int((values >= 0.9).sum()),
            "n_types": len(values), "per_type": per_type}


def train_and_encode(overrides: list[str], runs_dir: Path, experiment: str) -> tuple[Path, object]:
    import anndata as ad

    run_dir = sae4scfm.train(sae4scfm.compose("train", [*overrides, f"runs_dir={runs_dir}", f"experiment={experiment}"]))
    address = [f"runs_dir={runs_dir}", f"sae_checkpoint.experiment={experiment}", f"sae_checkpoint.timestamp={run_dir.name}"]
    sae4scfm.generate_features(sae4scfm.compose("features", [*address, "features.token_features=false"]))
    return run_dir, ad.read_h5ad(run_dir / "features" / "features.h5ad")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="pbmc")
    p.add_argument("--scfm", default="demo")
    p.add_argument("--layer", type=int, default=-1, help="residual-stream layer; -1 = the last")
    p.add_argument("--token-epochs", type=int, default=3)
    p.add_argument("--cell-epochs", type=int, default=60)
    p.add_argument("--cell-batch", type=int, default=64, help="cells per step of the cell-level SAEs")
    p.add_argument("--min-cells", type=int, default=5)
    p.add_argument("--runs-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every training run")
    args = p.parse_args()

    base = [f"scfm={args.scfm}", f"data={args.data}", "sae=topk", "wandb.mode=disabled", "seed=0", *args.overrides]
    probe = sae4scfm.compose("train", base)
    label_key = probe.data.get("cell_type_key")
    if not label_key:
        raise InputError(f"data={args.data} has no data.cell_type_key; the benchmark scores cell types.")
    layer = args.layer
    if layer < 0:
        from sae4scfm.scfm import load_scfm

        layer = load_scfm(probe.scfm, "cpu").n_layers + 1 + layer
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="cell_repr_"))
    results: dict[str, dict[str, dict]] = {}
    for model, extra in (("trained", []), ("random_init", ["scfm.random_init=true"])):
        common = [*base, *extra, f"sae.target_layer={layer}"]
        _, feats = train_and_encode([*common, f"train.n_epochs={args.token_epochs}"], runs_dir, f"{model}-tokens")
        for name in ("max", "mean", "sae_of_mean"):
            results.setdefault(name, {})[model] = score(feats, name, label_key, args.min_cells)
        for hook in ("cell_mean", "cls"):
            cell = [*common, f"sae.hook_point={hook}", f"train.n_epochs={args.cell_epochs}",
                    f"train.batch_size={args.cell_batch}", "train.calibration_batches=8"]
            try:
                _, feats = train_and_encode(cell, runs_dir, f"{model}-{hook}")
            except InputError as e:  # cls on a family without one
                print(f"skipping the {hook} SAE: {e}")
                continue
            results.setdefault(f"cell SAE ({hook})", {})[model] = score(feats, hook, label_key, args.min_cells)

    print(f"\ncell representations: scfm={args.scfm} data={args.data} layer {layer}; features selected on train "
          f"cells, AUROC on eval cells ({label_key})")
    head = f"| {'representation':<22} | {'model':<11} | {'fire/cell':>13} | {'eval AUROC':>10} | {'#types>=0.9':>11} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, by_model in results.items():
        for model, r in by_model.items():
            print(f"| {name:<22} | {model:<11} | {r['fire_per_cell']:>7.1f} / {r['d_sae']:<3} | "
                  f"{r['eval_auroc_mean']:>10.3f} | {r['n_types_ge_0.9']:>4} of {r['n_types']:<3} |")
    if args.out:
        args.out.write_text(json.dumps({"scfm": args.scfm, "data": args.data, "layer": layer, "results": results},
                                       indent=1))
    print(f"runs: {runs_dir}")


if __name__ == "__main__":
    main()
