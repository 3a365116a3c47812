"""Throughput of the default pipeline on this machine: extraction (batched vs one cell per
forward, same run) and TopK SAE training steps. Prints figures; asserts nothing.

    python benchmarks/pipeline.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sae4scfm
from sae4scfm.saes import TopKSAE
from sae4scfm.scfm.loading import load_model_and_data
from sae4scfm.training.trainer import Member, train_step


def cells_per_second(adapter, tokens, batch_size: int, n_cells: int) -> float:
    sub = tokens.subset(np.arange(n_cells))
    start = time.perf_counter()
    for batch in sub.batches(batch_size):
        adapter.capture(batch, [2])
    return n_cells / (time.perf_counter() - start)


def main() -> None:
    cfg = sae4scfm.compose("train", ["wandb.mode=disabled"])
    adapter, adata, tokens = load_model_and_data(cfg, "cpu")
    print(f"torch threads: {torch.get_num_threads()}, cells: {len(tokens)}, "
          f"mean tokens/cell: {tokens.lengths.mean():.0f}")
    batched = cells_per_second(adapter, tokens, 32, len(tokens))
    single = cells_per_second(adapter, tokens, 1, 100)
    print(f"extraction to layer 2: batched (32 cells, length-sorted) {batched:.0f} cells/s, "
          f"one cell per forward {single:.0f} cells/s, ratio {batched / single:.1f}x")

    torch.manual_seed(0)
    sae = TopKSAE(128, 512, k=16)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, fused=True)
    x = torch.randn(1024, 128)
    n = 100
    step_cfg = sae4scfm.compose("train", ["train.log_every=1000000000", "train.checkpoint_every=1000000000"])
    with tempfile.TemporaryDirectory() as tmp:  # the trainer's own step; total n + 6: no checkpoint inside
        m = Member(step_cfg, Path(tmp), sae, opt, torch.zeros(512, dtype=torch.long), 0, 1.0, None)
        for step in range(1, 6):
            train_step(m, x, step, n + 6, 1, 0)
        start = time.perf_counter()
        for step in range(6, n + 6):
            train_step(m, x, step, n + 6, 1, 0)
    dt = (time.perf_counter() - start) / n
    print(f"TopK SAE step (d_in 128, d_sae 512, k 16, batch 1024): {1 / dt:.0f} steps/s, {1024 / dt:.0f} tokens/s")


if __name__ == "__main__":
    main()
