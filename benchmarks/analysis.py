"""Label AUROC at SAE scale: ``label_auroc`` vs a per-feature ``sklearn.metrics.roc_auc_score`` loop.

Synthetic SAE activations: ``--features`` latents x ``--cells`` cells, CSR float32 (as in
features.h5ad), non-negative, each latent firing on a log-uniform fraction of cells (mean
``--density``) with lognormal magnitudes; ``--tied`` of the latents fire preferentially in the cells
of one label value (so their AUROC is far from 0.5). One label column with ``--values`` values of
unequal sizes.

Reported:
  ours      wall time of ``label_auroc(X, labels)`` (all features x all values, exact), and the
            peak extra memory of that call: tracemalloc peak above the baseline (a second, traced
            call; numpy/scipy buffers are traced) and the growth of the process's peak RSS (VmHWM,
            reset just before the untraced call via /proc/self/clear_refs), both next to the
            size of the sparse input (data + indices + indptr).
  sklearn   per feature: densify the column, then ``roc_auc_score(labels == v, column)`` for every
            value v. Timed on ``--sklearn-features`` randomly chosen features and extrapolated
            linearly to all features (time per feature x n_features; every feature costs the same
            there: it is one dense column of ``--cells`` cells). The subsample's AUROCs are compared
            with ours (max abs difference).

    python benchmarks/analysis.py [--cells 100000] [--features 16384] [--density 0.01] [--values 10]
                                  [--sklearn-features 64] [--metrics auroc,f1,ami]

``--metrics`` additionally times ``label_scoring`` with those metrics (F1 of the best threshold, AMI).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd
import scipy.sparse as sp
from memory import peak_rss_bytes, reset_peak_rss


def synthetic_activations(n_cells, n_features, density, n_values, tied, seed=0):
    """(CSR float32 [n_cells, n_features], labels Series [n_cells]) as described in the module doc."""
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(n_values, 2.0))
    labels = rng.choice(n_values, size=n_cells, p=sizes)
    # log-uniform firing rates over two decades, rescaled so their mean is `density`
    rate = np.exp(rng.uniform(np.log(0.1), np.log(10.0), n_features))
    rate = np.minimum(rate * density / rate.mean(), 0.5)
    k = rng.binomial(n_cells, rate)
    col = np.repeat(np.arange(n_features, dtype=np.int32), k)
    row = rng.integers(0, n_cells, col.size, dtype=np.int32)
    # tied latents: 80% of their firings go to cells of their value
    tied_value = np.where(rng.random(n_features) < tied, rng.integers(0, n_values, n_features), -1)
    members = [np.flatnonzero(labels == v) for v in range(n_values)]
    tv = tied_value[col]
    pick = (tv >= 0) & (rng.random(col.size) < 0.8)
    for v in range(n_values):
        sel = np.flatnonzero(pick & (tv == v))
        if members[v].size:
            row[sel] = members[v][rng.integers(0, members[v].size, sel.size)]
    val = rng.lognormal(0.0, 1.0, col.size).astype(np.float32)
    X = sp.csr_matrix((val, (row, col)), shape=(n_cells, n_features), dtype=np.float32)
    X.sum_duplicates()  # duplicate (cell, latent) draws are summed
    names = np.array([f"type{v}" for v in range(n_values)], dtype=object)
    return X, pd.Series(names[labels])


def nbytes(X):
    return X.data.nbytes + X.indices.nbytes + X.indptr.nbytes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--features", type=int, default=16_384)
    p.add_argument("--density", type=float, default=0.01, help="mean fraction of cells a latent fires on")
    p.add_argument("--values", type=int, default=10, help="distinct values of the label column")
    p.add_argument("--tied", type=float, default=0.2, help="fraction of latents tied to a label value")
    p.add_argument("--sklearn-features", type=int, default=64, help="features timed with sklearn")
    p.add_argument("--metrics", default="", help="also time label_scoring with these metrics, e.g. auroc,f1,ami")
    p.add_argument("--no-memory", action="store_true", help="skip the traced (memory) run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from sae4scfm.analysis.labels import label_auroc, label_scoring

    t0 = time.perf_counter()
    X, labels = synthetic_activations(args.cells, args.features, args.density, args.values, args.tied, args.seed)
    print(f"data: {args.cells} cells x {args.features} features, nnz {X.nnz} ({X.nnz / np.prod(X.shape):.2%}), "
          f"CSR float32 {nbytes(X) / 2**20:.0f} MiB, {args.values} label values "
          f"({labels.value_counts().min()}..{labels.value_counts().max()} cells), built in "
          f"{time.perf_counter() - t0:.1f}s")

    gc.collect()
    rss_reset = reset_peak_rss()
    rss0 = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() if rss_reset else peak_rss_bytes()
    t0 = time.perf_counter()
    auc = label_auroc(X, labels)
    t_ours = time.perf_counter() - t0
    rss_growth = max(peak_rss_bytes() - rss0, 0)
    print(f"ours:    label_auroc {auc.shape[0]} features x {auc.shape[1]} values in {t_ours:.2f}s")

    if not args.no_memory:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        label_auroc(X, labels)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        size = nbytes(X)
        print(f"memory:  sparse input {size / 2**20:.0f} MiB; peak extra (tracemalloc) {peak / 2**20:.0f} MiB "
              f"= {peak / size:.1f}x input; peak-RSS growth during the untraced call {rss_growth / 2**20:.0f} MiB "
              f"= {rss_growth / size:.1f}x input" + ("" if rss_reset else " (peak RSS not resettable: a lower bound)"))

    rng = np.random.default_rng(args.seed + 1)
    sub = np.sort(rng.choice(args.features, size=min(args.sklearn_features, args.features), replace=False))
    Xc = X[:, sub].tocsc()
    y = labels.to_numpy()
    values = list(auc.columns)
    ref = np.empty((sub.size, len(values)))
    t0 = time.perf_counter()
    for i in range(sub.size):
        column = Xc[:, i].toarray().ravel()
        for j, v in enumerate(values):
            ref[i, j] = roc_auc_score(y == v, column)
    t_sub = time.perf_counter() - t0
    t_sklearn = t_sub / sub.size * args.features
    err = np.abs(auc.to_numpy()[sub] - ref).max()
    print(f"sklearn: {sub.size} features x {len(values)} values in {t_sub:.2f}s "
          f"({t_sub / sub.size * 1e3:.1f} ms/feature) -> extrapolated to {args.features} features: {t_sklearn:.0f}s")
    print(f"speed-up: {t_sklearn / t_ours:.0f}x (target >= 100x); max |ours - sklearn| on the subsample: {err:.1e}")

    if args.metrics:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        obs = pd.DataFrame({"cell_type": labels})
        for m in metrics:
            t0 = time.perf_counter()
            label_scoring(X, obs, ["cell_type"], min_cells=1, metrics=[m])
            print(f"label_scoring metrics=[{m}]: {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
