"""SAE training tokens/s reading the on-disk activation store through the prefetching
``ShufflingBuffer`` vs training from an in-memory tensor (the issue's bar: >= 90 %).

Writes a synthetic float32 store of ``--tokens`` rows [--d-in] in shards of ``--shard-tokens``
rows (the extraction's writer), then times the trainer's own ``train_step`` of a TopK SAE on
(a) batches gathered by a random permutation from one in-memory tensor, (b) the buffer with each
``--prefetch`` value (fills read ahead in a background thread; 0 = read inline, for reference). The sources take turns for ``--rounds`` rounds of ``--steps`` steps each
(after untimed warm-up steps), and each reports its best round, so load from other processes on a
shared machine hits all three alike. Asserts nothing.

    python benchmarks/buffer_throughput.py [--tokens 200000] [--d-in 256] [--d-sae 2048] [--k 32] [--device cpu]
                                           [--prefetch 2,1,0]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sae4scfm.saes import TopKSAE
from sae4scfm.store.buffer import ShufflingBuffer
from sae4scfm.store.shards import ActivationStore, _ShardWriter
from sae4scfm.training.trainer import Member, train_step


def write_store(root: Path, n: int, d: int, shard_tokens: int) -> ActivationStore:
    g = torch.Generator().manual_seed(0)
    w = _ShardWriter(root, layer=0, d_model=d, dtype="float32", shard_tokens=shard_tokens, include_special=False)
    zeros = torch.zeros(8192, dtype=torch.long)
    for start in range(0, n, 8192):
        rows = min(8192, n - start)
        w.add(torch.randn(rows, d, generator=g), zeros[:rows], zeros[:rows], zeros[:rows].bool())
    w.close(n_cells=1)
    return ActivationStore(root)


def stepper(d_in: int, d_sae: int, k: int, device: str, run_dir: Path):
    """``step(x)``: one ``train_step`` of a fresh TopK SAE (flat schedule, no logging, no checkpoints)."""
    torch.manual_seed(0)
    sae = TopKSAE(d_in, d_sae, k=k).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    cfg = OmegaConf.create({"train": {"lr_decay_frac": 0.0, "sparsity_warmup_frac": 0.0, "grad_clip": 1.0,
                                      "autocast": "bf16", "dead_after_tokens": 10**7, "log_every": 10**9,
                                      "checkpoint_every": 10**9}, "sae": {"hyperparams": {"lr": 1e-4}}})
    m = Member(cfg, run_dir, sae, opt, torch.zeros(d_sae, dtype=torch.long, device=device), 0, 1.0, None)
    count = itertools.count(1)
    return lambda x: train_step(m, x.to(device, non_blocking=True), next(count), 10**9, 1, 0)


def tokens_per_s(batches, step, n_steps: int, device: str) -> float:
    """Rows per second of ``n_steps`` steps on the next batches of the iterator ``batches``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, rows = time.perf_counter(), 0
    for x in itertools.islice(batches, n_steps):
        step(x)
        rows += len(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return rows / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--shard-tokens", type=int, default=65536)
    ap.add_argument("--buffer-tokens", type=int, default=131072)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per source and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prefetch", default="2,1,0", help="buffer.prefetch values timed (fills read ahead)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sae4scfm-buffer-bench-") as tmp:
        store = write_store(Path(tmp) / "store", a.tokens, a.d_in, a.shard_tokens)
        n_batches = a.steps * a.rounds + a.warmup
        epochs = -(-n_batches * a.batch_size // store.n_tokens)

        def from_disk(prefetch: int):
            buffer = ShufflingBuffer(store, a.batch_size, 0, a.buffer_tokens, a.chunk_tokens, prefetch)
            return itertools.chain.from_iterable(buffer.epoch(e) for e in range(epochs))

        in_memory = torch.cat([s["acts"] for s in store.iter_shards()])
        if a.device.startswith("cuda"):
            in_memory = in_memory.pin_memory()

        def from_memory():
            for e in range(epochs):
                perm = torch.randperm(len(in_memory), generator=torch.Generator().manual_seed(e))
                for i in range(0, len(perm) - a.batch_size + 1, a.batch_size):
                    yield in_memory[perm[i:i + a.batch_size]]

        sources = {"in-memory tensor": from_memory(),
                   **{f"on-disk buffer, prefetch={n}": from_disk(int(n)) for n in a.prefetch.split(",")}}
        steps = {name: stepper(a.d_in, a.d_sae, a.k, a.device, Path(tmp)) for name in sources}
        for name, batches in sources.items():  # untimed warm-up
            tokens_per_s(batches, steps[name], a.warmup, a.device)
        results = {name: 0.0 for name in sources}
        for _ in range(a.rounds):
            for name, batches in sources.items():
                results[name] = max(results[name], tokens_per_s(batches, steps[name], a.steps, a.device))
    base = results["in-memory tensor"]
    print(f"TopK SAE d_in {a.d_in}, d_sae {a.d_sae}, k {a.k}, batch {a.batch_size}, best of {a.rounds} rounds of {a.steps} steps, "
          f"device {a.device}, {torch.get_num_threads()} threads; store {a.tokens} rows float32, "
          f"fills of {a.buffer_tokens} rows in chunks of {a.chunk_tokens}")
    print(f"{'source':<30} {'tokens/s':>12} {'vs in-memory':>13}")
    for name, rate in results.items():
        print(f"{name:<30} {rate:>12,.0f} {rate / base:>12.1%}")


if __name__ == "__main__":
    main()
