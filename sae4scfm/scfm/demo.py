"""The offline demo scFM: a small scGPT pretrained by our own code on scanpy's bundled PBMC cells.

Built once on first use into the user cache (``$SAE4SCFM_CACHE`` or the platform
cache dir), keyed by a hash of its config, and written in scGPT's official
checkpoint layout (``best_model.pt``, ``vocab.json``, ``args.json``) so that it
loads through the real scGPT adapter. ``pretrain_report.json`` beside them holds
the held-out masked-value error against the per-gene-mean baseline.

The build is deterministic for a seed: one thread, deterministic algorithms, every
random draw from a seeded generator. Float results still depend on which CPU kernels
run (ATen dispatches AVX-512 or AVX2 code, MKL picks its GEMM by CPU and vendor), so
``demo_checkpoint`` builds in a child process with those pinned (``BUILD_ENV``): the
same bits on every x86-64 machine with AVX2 and the same torch/MKL versions. Other
CPUs (ARM) get a model from the same recipe that differs in the last bits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from platformdirs import user_cache_dir
from tqdm.auto import tqdm

from sae4scfm.data import load_pbmc, split_cells
from sae4scfm.scfm.scgpt import ScGPTAdapter, ScGPTConfig, ScGPTModel, masked_value_loss, random_value_mask
from sae4scfm.scfm.scgpt.model import SPECIAL_TOKENS
from sae4scfm.scfm.tokens import TokenizedCells

log = logging.getLogger(__name__)

PRETRAIN_VERSION = 3  # bump when the pretraining recipe changes, so caches are rebuilt
BUILD_THREADS = 1  # torch threads during the build: results depend on the count; 1 is also fastest on shared cores
# The child process's CPU kernels on x86-64: ATen's vectorised kernels at AVX2 (AVX-512 machines would
# otherwise sum in other orders), MKL in its reproducible SSE2 branch (the one branch MKL keeps the same on
# Intel and AMD; about 2x slower GEMMs). Read once at start-up, hence a child process.
BUILD_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def cache_root() -> Path:
    return Path(os.environ.get("SAE4SCFM_CACHE") or user_cache_dir("sae4scfm"))


def demo_checkpoint(cfg: dict) -> Path:
    """Folder of the demo checkpoint for ``cfg`` (the ``scfm.pretrain`` settings), built if absent."""
    cfg = dict(cfg)
    key = hashlib.sha256(json.dumps({**cfg, "v": PRETRAIN_VERSION}, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_root() / "demo_scgpt" / key
    if (out / "pretrain_report.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent))
    try:
        build_demo(cfg, tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_demo(cfg: dict, out_dir: Path) -> dict:
    """``pretrain_demo(cfg, out_dir)`` in a child process with the CPU kernels pinned (``BUILD_ENV``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if platform.machine().lower() in ("x86_64", "amd64"):
        env.update(BUILD_ENV)
    code = ("import json, sys; from sae4scfm.scfm.demo import pretrain_demo; "
            "pretrain_demo(json.loads(sys.argv[1]), sys.argv[2])")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cfg), str(out_dir)], env=env)
    if done.returncode != 0:
        raise RuntimeError(f"building the demo scGPT failed (exit {done.returncode}); its error is printed above.")
    return json.loads((Path(out_dir) / "pretrain_report.json").read_text())


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int = BUILD_THREADS):
    """Within: ``threads`` torch threads, deterministic algorithms, the global torch RNG seeded with ``seed``
    (model init, dropout). All three are restored on exit."""
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic_before, warn_only=warn_only_before)
        torch.set_num_threads(threads_before)


def pretrain_demo(cfg: dict, out_dir: Path | str) -> dict:
    """Pretrain with scGPT's masked-value objective (value + GEPC heads) into ``out_dir``; returns the report.

    In this process, under ``deterministic_torch``: bit-identical for a seed on one machine, whatever
    the caller's thread count (``build_demo`` also pins the CPU kernels).
    """
    with deterministic_torch(int(cfg["seed"])):
        return _pretrain(cfg, Path(out_dir))


def _pretrain(cfg: dict, out_dir: Path) -> dict:
    seed = int(cfg["seed"])
    adata = load_pbmc()
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *adata.var_names])}
    mcfg = ScGPTConfig(n_tokens=len(vocab), d_model=cfg["d_model"], n_heads=cfg["n_heads"],
                       d_hid=cfg["d_hid"], n_layers=cfg["n_layers"], dropout=cfg["dropout"],
                       n_bins=cfg["n_bins"], max_seq_len=cfg["max_seq_len"])
    model = ScGPTModel(mcfg, pad_id=vocab["<pad>"])
    adapter = ScGPTAdapter(model, vocab, mcfg)
    tokens = adapter.tokenize(adata, seed=seed, source="data=pbmc")
    held_out = np.asarray(split_cells(adata.n_obs, cfg["eval_fraction"], seed)) == "eval"
    train, test = tokens.subset(np.flatnonzero(~held_out)), tokens.subset(np.flatnonzero(held_out))

    with torch.no_grad():  # start the value head at the mean target instead of 0 (skips a slow plateau)
        model.decoder.fc[-1].bias.fill_(float(train.values[~train.special].mean()))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.1 * total)) * 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    bar = tqdm(total=total, desc="pretraining demo scGPT", unit="step")
    model.train()
    for _ in range(cfg["epochs"]):
        epoch_cells = train.truncate(cfg["train_seq_len"], rng)  # a fresh random gene subset per epoch
        order = rng.permutation(len(train))
        for start in range(0, len(order), cfg["batch_size"]):
            batch = epoch_cells.collate(order[start:start + cfg["batch_size"]])
            sse, n = masked_value_loss(model, batch, random_value_mask(batch, cfg["mask_ratio"], gen))
            loss = sse / n.clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()

    report = evaluate_masked_values(model, train, test, cfg["mask_ratio"], seed)
    report.update(n_train_cells=len(train), n_test_cells=len(test), steps=total,
                  build={"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                         "mkl_cbwr": os.environ.get("MKL_CBWR", ""), "threads": torch.get_num_threads()})
    print(f"demo scGPT held-out masked-value MSE {report['model_mse']:.3f} vs per-gene-mean baseline "
          f"{report['baseline_mse']:.3f} ({report['model_mse'] / report['baseline_mse']:.2f}x)")
    torch.save(model.state_dict(), out_dir / "best_model.pt")
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "args.json").write_text(json.dumps(mcfg.to_args(), indent=1))
    (out_dir / "pretrain_report.json").write_text(json.dumps({**report, "config": cfg}, indent=1))
    return report


@torch.no_grad()
def evaluate_masked_values(model: ScGPTModel, train: TokenizedCells, test: TokenizedCells,
                           mask_ratio: float, seed: int) -> dict:
    """Held-out masked-value MSE of the value head vs predicting each gene's training mean."""
    genes, values = train.gene_ids[~train.special], train.values[~train.special]
    gene_mean = np.zeros(model.cfg.n_tokens, dtype=np.float64)
    counts = np.bincount(genes, minlength=model.cfg.n_tokens)
    np.add.at(gene_mean, genes, values)
    gene_mean = torch.from_numpy(gene_mean / np.maximum(counts, 1)).float()
    gene_mean[counts == 0] = float(values.mean())
    gen = torch.Generator().manual_seed(seed + 1)
    sse_model = sse_base = n = 0.0
    for batch in test.batches(64):
        mask = random_value_mask(batch, mask_ratio, gen)
        masked = batch.values.masked_fill(mask, model.cfg.mask_value)
        pred = model(batch.gene_ids, masked, batch.padding_mask)["mlm"]
        truth = batch.values[mask]
        sse_model += float(((pred[mask] - truth) ** 2).sum())
        sse_base += float(((gene_mean[batch.gene_ids[mask]] - truth) ** 2).sum())
        n += int(mask.sum())
    return {"model_mse": sse_model / n, "baseline_mse": sse_base / n, "n_masked": int(n)}
