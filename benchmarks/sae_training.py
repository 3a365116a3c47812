"""TopK and BatchTopK SAE training throughput and quality: ours vs SAELens vs dictionary_learning,
in the same run, on the same data (d_in 512, d_sae 4096, k 32, batch 4096 by default).

Prints tokens/s, held-out FVU and dead fraction for each, the machine's dense float32 matmul
rate for a [B, d_in] @ [d_in, d_sae] product, and the encoder-GEMM floor (the one dense
product a TopK-family step cannot avoid), all on one device (``--device cuda``: every library's
SAE, the data and the GEMM on the GPU, timed between CUDA synchronisations). Asserts nothing.

    python benchmarks/sae_training.py [--steps 30] [--batch 4096] [--device cpu|cuda]
    python benchmarks/sae_training.py --device cuda --d-sae 65536 --k 64   # the issue's GPU check
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sae4scfm.saes import BatchTopKSAE, TopKSAE
from sae4scfm.training.schedules import geometric_median
from sae4scfm.training.trainer import Member, train_step


def synthetic_activations(n: int, d_in: int, n_true: int, k_true: int, seed: int) -> torch.Tensor:
    """x [n, d_in] = offset + Σ of k_true of n_true unit ground-truth directions with |N(0,1)|+0.5 weights
    (summed 4,096 rows at a time: never an [n, k_true, d_in] gather)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_true, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    offset = torch.randn(d_in, generator=torch.Generator().manual_seed(1234)) * 2
    idx = torch.randint(0, n_true, (n, k_true), generator=g)
    w = torch.randn(n, k_true, generator=g).abs() + 0.5
    return offset + torch.cat([torch.einsum("nk,nkd->nd", w[r], directions[idx[r]])
                               for r in torch.arange(n).split(4096)])


def fvu_and_dead(encode, decode, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        f = encode(x)
        x_hat = decode(f)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return fvu, float((f > 0).sum(0).eq(0).float().mean())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(name: str, step, batches: list[torch.Tensor], warmup: int) -> float:
    """Tokens/s of ``step(x)`` over ``batches`` after ``warmup`` untimed steps."""
    for x in batches[:warmup]:
        step(x)
    synchronize(batches[0].device)
    start = time.perf_counter()
    for x in batches[warmup:]:
        step(x)
    synchronize(batches[0].device)
    elapsed = time.perf_counter() - start
    return sum(len(x) for x in batches[warmup:]) / elapsed


def ours(arch: str, d_in: int, d_sae: int, k: int, lr: float, init: torch.Tensor, total: int):
    """Our SAE stepped by the trainer's own ``train_step`` (constant lr, dead after 10 batches);
    ``init`` is the first batch (on the device every library runs on), ``total`` the number of steps."""
    torch.manual_seed(0)
    sae = (TopKSAE if arch == "topk" else BatchTopKSAE)(d_in, d_sae, k=k).to(init.device)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(init[:2048]))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    cfg = OmegaConf.create({"train": {"lr_decay_frac": 0.0, "sparsity_warmup_frac": 0.0, "grad_clip": 1.0,
                                      "autocast": "none", "dead_after_tokens": 10 * len(init),
                                      "log_every": 10**9, "checkpoint_every": 10**9},
                            "sae": {"hyperparams": {"lr": lr}}})
    tmp = tempfile.TemporaryDirectory()
    m = Member(cfg, Path(tmp.name), sae, opt, torch.zeros(d_sae, dtype=torch.long, device=init.device), 0, 1.0,
               None)
    steps = iter(range(1, 10**9))

    def step(x, tmp=tmp):  # holds the temp dir until the benchmark ends
        # total + 1: the schedules are flat here, and no checkpoint is written inside the timed loop
        train_step(m, x, next(steps), total + 1, 1, 0)

    return step, lambda x: sae.eval().encode(x), sae.decode


def saelens(arch: str, d_in: int, d_sae: int, k: int, lr: float, init: torch.Tensor, total: int):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    device = str(init.device)
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)  # as SAELens's trainer: Adam, clip 1.0
    since_fired = torch.zeros(d_sae, device=init.device)

    def step(x):
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(x, {}, since_fired > 10, 0, False))
        with torch.no_grad():
            since_fired.add_(1)
            since_fired[out.feature_acts.bool().any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    def encode(x):
        sae.eval()
        return sae.encode(x)

    return step, encode, sae.decode


def _dictionary_learning_trainers():
    """dictionary_learning's trainers without its package __init__ (which imports nnsight)."""
    if "dictionary_learning" not in sys.modules:
        spec = importlib.util.find_spec("dictionary_learning")
        if spec is None:
            raise ImportError("dictionary_learning is not installed")
        pkg = types.ModuleType("dictionary_learning")
        pkg.__path__ = [str(Path(spec.origin).parent)]
        sys.modules["dictionary_learning"] = pkg
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    return TopKTrainer, BatchTopKTrainer


def dictionary_learning(arch: str, d_in: int, d_sae: int, k: int, lr: float, init: torch.Tensor, total: int):
    TopKTrainer, BatchTopKTrainer = _dictionary_learning_trainers()
    cls = TopKTrainer if arch == "topk" else BatchTopKTrainer
    trainer = cls(steps=10_000, activation_dim=d_in, dict_size=d_sae, k=k, layer=0, lm_name="bench",
                  lr=lr, warmup_steps=1, seed=0, device=str(init.device))
    n = [0]

    def step(x):
        trainer.update(n[0], x)
        n[0] += 1

    return step, trainer.ae.encode, trainer.ae.decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (data, SAEs and GEMM on it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = synthetic_activations((args.steps + 1) * args.batch, args.d_in, 2 * args.d_sae, args.k // 2, seed=0)
    data = data.to(device)
    batches, held_out = list(data[:-args.batch].split(args.batch)), data[-args.batch:]

    a, b = torch.randn(args.batch, args.d_in, device=device), torch.randn(args.d_in, args.d_sae, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    synchronize(device)
    gemm_s = (time.perf_counter() - start) / reps
    gflops = 2 * args.batch * args.d_in * args.d_sae / gemm_s / 1e9
    floor = args.batch / gemm_s
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; "
          f"[{args.batch}x{args.d_in}]@[{args.d_in}x{args.d_sae}] float32: {gflops:.0f} GFLOP/s; "
          f"encoder-GEMM floor {floor:,.0f} tokens/s")
    print(f"{'arch':10s} {'library':20s} {'tokens/s':>10s} {'vs best ref':>11s} {'of floor':>9s} "
          f"{'FVU':>7s} {'dead':>6s}   ({args.steps} steps x {args.batch} tokens)")
    for arch in ("topk", "batchtopk"):
        results = {}
        for lib, build in (("sae4scfm", ours), ("SAELens", saelens), ("dictionary_learning", dictionary_learning)):
            try:
                step, encode, decode = build(arch, args.d_in, args.d_sae, args.k, args.lr, batches[0],
                                             len(batches))
            except ImportError as e:
                print(f"{arch:10s} {lib:20s} unavailable ({e})")
                continue
            tps = run(lib, step, batches, args.warmup)
            results[lib] = (tps, *fvu_and_dead(encode, decode, held_out))
        best_ref = max((v[0] for k, v in results.items() if k != "sae4scfm"), default=float("nan"))
        for lib, (tps, fvu, dead) in results.items():
            print(f"{arch:10s} {lib:20s} {tps:10,.0f} {tps / best_ref:10.2f}x {tps / floor:8.0%} "
                  f"{fvu:7.3f} {dead:6.1%}")


if __name__ == "__main__":
    main()
