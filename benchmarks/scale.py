"""Peak memory of every stage at 10x and 100x the data: extraction, training, features, analysis.

Data: the built-in PBMC cells (``sae4scfm.data.load_pbmc()``, 700 cells x 765 genes, raw counts), the
first ``--base-cells`` of them, replicated ``factor`` times and perturbed (each copy's counts redrawn as
Poisson(counts x s), s ~ U(0.8, 1.2) per cell, so no two cells are equal), written once per factor as a
local TileDB-SOMA experiment (``tiledbsoma.io.from_anndata``) and read through ``data=soma`` with
``data.stream=true`` (cells read and tokenized per chunk, no X in memory).

Stages, each in its own fresh process (``python scale.py --stage ...``) so that each peak is its own:
  extract   load model + data, tokenize, ``store.extract.activation_stores`` (demo scGPT, layer 2)
  train     ``sae4scfm.train`` (TopK, k 8, d_sae 4 x 128, 1 epoch) reading that store
  features  ``sae4scfm.generate_features`` (streaming, token file included)
  analysis  ``sae4scfm.analyze_features``: label scoring, gene scoring, density and co-activation
Peak RSS = the stage process's ``ru_maxrss`` (MiB; it includes the interpreter, torch and the model,
~0.4-0.6 GiB, which do not grow with the data). Bar: at 100x within 1.3x of 10x for every stage.

    python benchmarks/scale.py                      # default: --base-cells 7 -> 70 and 700 cells (minutes)
    python benchmarks/scale.py --base-cells 700     # full size: 7,000 and 70,000 cells (hours on 2 CPUs)
    python benchmarks/scale.py --factors 10,100,1000 --workdir /big/disk/scale

Prints one table (stage x factor: peak RSS MiB, seconds) and the ratio of the largest to the smallest factor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("extract", "train", "features", "analysis")
LAYER = 2
RUN = ["scfm=demo", "sae=topk", f"sae.target_layer={LAYER}", "sae.hyperparams.k=8", "sae.dictionary_multiplier=4",
       "seed=0", "wandb.mode=disabled", "train.n_epochs=1", "train.batch_size=512", "train.checkpoint_every=100000"]
ANALYSES = ["analysis.run_label_scoring=true", "analysis.run_gene_scoring=true", "analysis.run_density=true",
            "analysis.run_coactivation=true"]


def DATA(uri: Path) -> list[str]:
    """The data overrides of one size: the local SOMA experiment at ``uri``, streamed."""
    return ["data=soma", f"data.uri={uri}", "data.cell_type_key=bulk_labels", "data.stream=true"]


def write_data(uri: Path, base_cells: int, factor: int, seed: int = 0) -> int:
    """``factor`` perturbed copies of the first ``base_cells`` PBMC cells as a SOMA experiment (measurement RNA,
    X layer raw); returns the cell count."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    import tiledbsoma.io

    from sae4scfm.data import load_pbmc

    pbmc = load_pbmc()[:base_cells]
    counts = sp.csr_matrix(pbmc.X)
    rng = np.random.default_rng(seed)
    blocks, names = [], []
    for copy in range(factor):
        scale = rng.uniform(0.8, 1.2, counts.shape[0])
        block = counts.multiply(scale[:, None]).tocsr()
        block.data = rng.poisson(block.data).astype(np.float32)
        block.eliminate_zeros()
        blocks.append(block)
        names += [f"{c}-{copy}" for c in pbmc.obs_names]
    obs = pd.concat([pbmc.obs] * factor)
    obs.index = names
    adata = ad.AnnData(X=sp.vstack(blocks).tocsr(), obs=obs, var=pbmc.var.copy())
    tiledbsoma.io.from_anndata(str(uri), adata, measurement_name="RNA", X_layer_name="raw")
    return len(names)


def run_stage(stage: str, work: Path) -> dict:
    """One stage on the data of ``work``; returns seconds and the peak RSS of this process."""
    import sae4scfm

    spec = json.loads((work / "spec.json").read_text())
    overrides = [*RUN, *DATA(Path(spec["data"])), f"runs_dir={work / 'runs'}", f"buffer.store_dir={work / 'store'}",
                 "experiment=scale"]
    start = time.perf_counter()
    if stage == "extract":
        from sae4scfm.scfm.loading import load_model_and_data
        from sae4scfm.store.extract import activation_stores

        cfg = sae4scfm.compose("train", overrides)
        adapter, adata, tokens = load_model_and_data(cfg, "cpu")
        activation_stores(cfg, adapter, adata, tokens, [LAYER])
    elif stage == "train":
        run_dir = sae4scfm.train(sae4scfm.compose("train", overrides))
        (work / "run.txt").write_text(run_dir.name)
    else:
        address = [f"runs_dir={work / 'runs'}", "sae_checkpoint.experiment=scale",
                   f"sae_checkpoint.timestamp={(work / 'run.txt').read_text()}"]
        if stage == "features":
            sae4scfm.generate_features(sae4scfm.compose("features", address))
        else:
            sae4scfm.analyze_features(sae4scfm.compose("analyze", [*address, *ANALYSES]))
    return {"seconds": time.perf_counter() - start,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-cells", type=int, default=7, help="PBMC cells replicated (700 = the built-in data)")
    p.add_argument("--factors", default="10,100", help="replication factors, smallest first")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--workdir", default=None, help="where data, stores and runs go (default: a temp dir)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        print("RESULT " + json.dumps(run_stage(args.stage, Path(args.work))), flush=True)
        return 0

    factors = [int(f) for f in args.factors.split(",")]
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stages {unknown}; available: {', '.join(STAGES)}")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="sae4scfm-scale-"))
    results: dict[tuple[str, int], dict] = {}
    n_cells = {}
    for factor in factors:
        work = root / f"x{factor}"
        work.mkdir(parents=True, exist_ok=True)
        data = work / "cells.soma"
        done = work / "cells.soma.cells"  # written after the experiment: a rerun with --workdir reuses it
        if not done.is_file():
            shutil.rmtree(data, ignore_errors=True)
            done.write_text(str(write_data(data, args.base_cells, factor)))
        n_cells[factor] = int(done.read_text())
        (work / "spec.json").write_text(json.dumps({"data": str(data), "cells": n_cells[factor]}))
        for stage in stages:
            print(f"[x{factor}: {n_cells[factor]} cells] {stage} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--work", str(work)],
                                  capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
            line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                results[stage, factor] = {"error": f"exit {proc.returncode}"}
                continue
            results[stage, factor] = json.loads(line[len("RESULT "):])
            r = results[stage, factor]
            print(f"  {r['seconds']:.1f}s, peak RSS {r['peak_mib']:,.0f} MiB", file=sys.stderr, flush=True)

    lo, hi = factors[0], factors[-1]
    header = ["stage", *[f"x{f} ({n_cells[f]:,} cells) MiB / s" for f in factors], f"x{hi} / x{lo} RSS", "bar <= 1.3"]
    print("\n| " + " | ".join(header) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |")
    ok_all = True
    for stage in stages:
        cells = []
        for f in factors:
            r = results.get((stage, f), {})
            cells.append(r.get("error") or f"{r['peak_mib']:,.0f} / {r['seconds']:.0f}")
        a, b = results.get((stage, lo), {}), results.get((stage, hi), {})
        if "peak_mib" in a and "peak_mib" in b:
            ratio = b["peak_mib"] / a["peak_mib"]
            ok = ratio <= 1.3
            cells += [f"{ratio:.2f}", "yes" if ok else "NO"]
        else:
            ok = False
            cells += ["", "NO"]
        ok_all &= ok
        print("| " + " | ".join([stage, *cells]) + " |")
    print(f"\nbase {args.base_cells} PBMC cells; work dir {root}; peak RSS = ru_maxrss of the stage's own process")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
