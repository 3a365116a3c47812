"""A synthetic run dir with planted structure, made in seconds with numpy (benchmarks and tests of the atlas).

``synthetic_run(runs_dir)`` writes ``<runs_dir>/<experiment>/<timestamp>/`` in the README's run-dir
format, through the project's own writers: ``config.yaml`` (a composed train config, data=h5ad),
``cfg.json`` + ``sae.safetensors`` (a TopK SAE, ``SAE.save``), ``metrics.jsonl``, ``eval.json``,
``features/features.h5ad`` (cells x features CSR, X = max over the cell's gene tokens, ``layers["mean"]``)
and ``features/token_features.h5ad`` (gene tokens x features), and the analyses' outputs
(``analysis/results*.{parquet,csv}``, the ``var`` annotations, ``gene_scores.parquet``,
``enrichment.csv``, ``coactivation_pairs.csv``, ``modules.csv``) computed by the project's statistics
(label AUROC, token gene scores, marker-set Fisher enrichment, density) on the synthetic latents.
The dataset itself is ``<run>/synthetic_cells.h5ad`` (counts of the genes each cell reads).

Planted structure (``<run>/synthetic.json`` lists it): cells of 8 PBMC types (the package's marker
sets), each reading its type's marker genes plus random background genes; per type one feature that
fires on the type's marker-gene tokens (top genes = the markers, marker-set enriched, high AUROC for the
type, one co-firing module with the gene features), one feature per marker gene, and one feature
firing in STIM cells only (condition CTRL/STIM). Every other feature fires on random tokens with
Zipf-like frequencies (so densities span orders of magnitude); its decoder direction is random, the
planted features of a type share one.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae4scfm.errors import InputError

CELL_TYPES = ["CD4 T", "CD8 T", "NK", "B", "CD14 Monocyte", "FCGR3A Monocyte", "Dendritic (cDC)", "pDC"]
MARKERS_PER_TYPE = 6
CELL_TYPE_KEY, CONDITION_KEY = "cell_type", "condition"


def _marker_genes() -> dict[str, list[str]]:
    """{cell type: its first MARKERS_PER_TYPE marker genes not used by an earlier type}."""
    sets = json.loads((Path(__file__).parents[1] / "resources" / "cell_type_markers.json").read_text())
    used: set[str] = set()
    out = {}
    for t in CELL_TYPES:
        genes = [g for g in sets[t] if g not in used][:MARKERS_PER_TYPE]
        used.update(genes)
        out[t] = genes
    return out


def _max_by_cell(T: sp.csr_matrix, cell_of_token: np.ndarray, n_cells: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(max, mean) over each cell's token rows of T [tokens, features] -> [cells, features] CSR float32."""
    coo = T.tocoo()
    rows = cell_of_token[coo.row].astype(np.int64)
    key = rows * T.shape[1] + coo.col
    order = np.argsort(key, kind="stable")
    key, vals = key[order], coo.data[order]
    uniq, start = np.unique(key, return_index=True)
    mx = np.maximum.reduceat(vals, start) if len(vals) else vals
    sm = np.add.reduceat(vals.astype(np.float64), start) if len(vals) else vals
    r, c = np.divmod(uniq, T.shape[1])
    n_tok = np.bincount(cell_of_token, minlength=n_cells).astype(np.float64)
    shape = (n_cells, T.shape[1])
    X = sp.csr_matrix((mx.astype(np.float32), (r, c)), shape=shape)
    M = sp.csr_matrix(((sm / n_tok[r]).astype(np.float32), (r, c)), shape=shape)
    return X, M


def synthetic_run(out_dir: Path, n_features: int = 100_000, n_cells: int = 2_000, *, genes_per_cell: int = 48,
                  n_background_genes: int = 1_000, k: int = 8, d_in: int = 32, layer: int = 2, seed: int = 0,
                  experiment: str = "synthetic", timestamp: str = "Jan01-00-00") -> Path:
    """Write a synthetic run to ``<out_dir>/<experiment>/<timestamp>`` (module docstring); returns the run dir.

    n_features: SAE width d_sae; n_cells cells reading ``genes_per_cell`` genes each (their type's
    markers + background genes out of ``n_background_genes``); ``k`` random features fire per token on
    top of the planted ones. Deterministic for a given seed. Refuses an existing run dir.
    """
    from omegaconf import OmegaConf

    from sae4scfm.analysis.enrichment import fisher_enrichment
    from sae4scfm.analysis.gene_scoring import density_scores, token_gene_scores
    from sae4scfm.analysis.labels import label_scoring
    from sae4scfm.analysis.primitives import bh_fdr
    from sae4scfm.analysis.results import labelled, update_results, write_feature_annotations
    from sae4scfm.atomic import atomic_write, atomic_write_json, atomic_write_text
    from sae4scfm.cli import compose
    from sae4scfm.saes import build_sae

    def write_h5ad(adata: ad.AnnData, path: Path) -> None:
        atomic_write(path, lambda p: adata.write_h5ad(p))

    markers = _marker_genes()
    n_planted = len(CELL_TYPES) * (1 + MARKERS_PER_TYPE) + 1
    if n_features < 2 * n_planted:
        raise InputError(f"synthetic_run needs n_features >= {2 * n_planted} (it plants {n_planted}), got {n_features}")
    if not MARKERS_PER_TYPE < genes_per_cell <= MARKERS_PER_TYPE + n_background_genes:
        raise InputError(f"synthetic_run: genes_per_cell must be in {MARKERS_PER_TYPE + 1}.."
                         f"{MARKERS_PER_TYPE + n_background_genes}, got {genes_per_cell}")
    run_dir = Path(out_dir) / experiment / timestamp
    if run_dir.exists():
        raise InputError(f"{run_dir} exists; delete it or pass another timestamp")
    (run_dir / "features").mkdir(parents=True)
    (run_dir / "analysis").mkdir()
    rng = np.random.default_rng(seed)

    # --- cells and their gene tokens
    marker_list = [g for t in CELL_TYPES for g in markers[t]]
    genes = np.array(marker_list + [f"SYN{i:04d}" for i in range(n_background_genes)], dtype=object)
    gene_code = {g: i for i, g in enumerate(genes)}
    cell_type = rng.integers(0, len(CELL_TYPES), n_cells)
    stim = rng.random(n_cells) < 0.5
    split = np.where(rng.random(n_cells) < 0.8, "train", "eval")
    split[:2], split[2:4] = "train", "eval"
    n_bg = genes_per_cell - MARKERS_PER_TYPE
    bg = np.argpartition(rng.random((n_cells, n_background_genes)), n_bg, axis=1)[:, :n_bg] + len(marker_list)
    type_markers = np.array([[gene_code[g] for g in markers[t]] for t in CELL_TYPES])
    token_genes = np.concatenate([type_markers[cell_type], bg], axis=1)  # [cells, genes_per_cell]
    cell_of_token = np.repeat(np.arange(n_cells), genes_per_cell)
    gene_of_token = token_genes.ravel()
    n_tokens = gene_of_token.size
    is_marker = (np.arange(n_tokens) % genes_per_cell) < MARKERS_PER_TYPE

    # --- planted features, spread over the index range
    slots = rng.choice(n_features, n_planted, replace=False)
    type_feature = {t: int(slots[i]) for i, t in enumerate(CELL_TYPES)}
    gene_feature = {g: int(slots[len(CELL_TYPES) + i]) for i, g in enumerate(marker_list)}
    stim_feature = int(slots[-1])
    rows, cols, vals = [], [], []
    tok = np.flatnonzero(is_marker)
    rows += [tok, tok]
    cols += [np.array([type_feature[CELL_TYPES[t]] for t in range(len(CELL_TYPES))])[cell_type[cell_of_token[tok]]],
             np.array([gene_feature[g] for g in marker_list])[gene_of_token[tok]]]
    vals += [3.0 + 3.0 * rng.random(tok.size), 1.0 + 2.0 * rng.random(tok.size)]
    stim_tok = np.flatnonzero(stim[cell_of_token] & ~is_marker & (rng.random(n_tokens) < 0.1))
    rows.append(stim_tok)
    cols.append(np.full(stim_tok.size, stim_feature))
    vals.append(2.0 + rng.random(stim_tok.size))
    # --- random features with Zipf-like firing frequencies
    pool = rng.permutation(np.setdiff1d(np.arange(n_features), slots))  # planted features stay clean
    p = 1.0 / (np.arange(pool.size) + 20.0) ** 0.9
    p /= p.sum()
    rows.append(np.repeat(np.arange(n_tokens), k))
    cols.append(pool[rng.choice(pool.size, n_tokens * k, p=p)])
    vals.append(0.05 + rng.exponential(1.0, n_tokens * k))
    T = sp.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n_tokens, n_features))
    T.sum_duplicates()
    X, M = _max_by_cell(T, cell_of_token, n_cells)

    # --- the dataset and the composed config
    cells = np.array([f"SYNC{i:05d}-1" for i in range(n_cells)], dtype=object)
    obs = pd.DataFrame({
        CELL_TYPE_KEY: pd.Categorical(np.array(CELL_TYPES, dtype=object)[cell_type], categories=CELL_TYPES),
        CONDITION_KEY: pd.Categorical(np.where(stim, "STIM", "CTRL"), categories=["CTRL", "STIM"]),
        "n_counts": np.full(n_cells, float(genes_per_cell)),
        "split": pd.Categorical(split, categories=["train", "eval"]),
    }, index=pd.Index(cells, name=None))
    counts = sp.csr_matrix((np.ones(n_tokens, np.float32), (cell_of_token, gene_of_token)),
                           shape=(n_cells, len(genes)))
    data_path = run_dir / "synthetic_cells.h5ad"
    write_h5ad(ad.AnnData(counts, obs=obs.drop(columns="split"), var=pd.DataFrame(index=list(genes))), data_path)
    cfg = compose("train", [
        "scfm=demo", "data=h5ad", f"data.path={data_path}", f"data.cell_type_key={CELL_TYPE_KEY}",
        f"data.condition_key={CONDITION_KEY}", "sae=topk", f"sae.target_layer={layer}", f"sae.hyperparams.k={k}",
        f"experiment={experiment}", f"runs_dir={Path(out_dir)}", f"seed={seed}", "wandb.mode=disabled"])
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    # --- the SAE: planted features of a type share a decoder direction
    W_dec = rng.standard_normal((n_features, d_in)).astype(np.float32)
    for i, t in enumerate(CELL_TYPES):
        base = rng.standard_normal(d_in).astype(np.float32) * 3
        planted = [type_feature[t]] + [gene_feature[g] for g in markers[t]]
        W_dec[planted] = base + rng.standard_normal((len(planted), d_in)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    import torch

    sae = build_sae("topk", d_in, n_features, {"k": k})
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(W_dec))
        sae.W_enc.copy_(torch.from_numpy(np.ascontiguousarray(W_dec.T)))
    atomic_write_text(run_dir / "metrics.jsonl", "".join(
        json.dumps({"step": s, "epoch": 0, "loss": 10.0 / s, "mse": 10.0 / s, "fvu": 0.5 / s ** 0.5, "l0": float(k),
                    "lr": 3e-4, "dead_fraction": 0.0, "auxk": 0.0}) + "\n" for s in (10, 20, 30)))
    atomic_write_json(run_dir / "eval.json", {
        "fvu": 0.1, "explained_variance": 0.9, "l0": float(k), "dead_fraction": float(np.mean(T.getnnz(0) == 0)),
        "n_eval_tokens": int((split[cell_of_token] == "eval").sum()), "loss_clean": 300.0, "loss_spliced": 303.0,
        "loss_mean_ablated": 350.0, "loss_delta": 3.0, "loss_recovered": 0.94})

    # --- features.h5ad and token_features.h5ad
    var = pd.DataFrame({"feature_id": np.arange(n_features)}, index=[str(i) for i in range(n_features)])
    meta = {"architecture": "topk", "genes_seen": genes.astype(str), "layer": layer, "pooling": "max",
            "representations": {"max": "max over the cell's gene tokens of the token latents",
                                "mean": "mean over the cell's gene tokens of the token latents"},
            "run_dir": str(run_dir), "sae_hook_point": "tokens", "synthetic": True}
    features_file = run_dir / "features" / "features.h5ad"
    write_h5ad(ad.AnnData(X, obs=obs, var=var, layers={"mean": M}, uns={"sae4scfm": meta}), features_file)
    token_obs = pd.DataFrame({
        "cell": pd.Categorical(cells[cell_of_token], categories=cells), "cell_index": cell_of_token.astype(np.int64),
        "gene": pd.Categorical(genes[gene_of_token], categories=genes),
        "gene_name": pd.Categorical(genes[gene_of_token], categories=genes), "gene_id": gene_of_token.astype(np.int64),
        "split": pd.Categorical(split[cell_of_token], categories=["train", "eval"]),
    }, index=[str(i) for i in range(n_tokens)])
    tokens = ad.AnnData(T, obs=token_obs, var=var.copy(), uns={"sae4scfm": {k_: v for k_, v in meta.items()
                                                                           if k_ != "genes_seen"}})
    write_h5ad(tokens, run_dir / "features" / "token_features.h5ad")

    # --- analyses, with the project's statistics and writers
    out = run_dir / "analysis"
    params = {"synthetic": True, "seed": seed}

    def record(analysis: str, table: pd.DataFrame) -> None:
        update_results(out, analysis, table)
        write_feature_annotations(features_file, analysis, table, params)

    is_train = split == "train"
    record("label_scoring", label_scoring(X, obs, [CELL_TYPE_KEY, CONDITION_KEY], min_cells=5, metrics=["auroc"],
                                          cell_type_key=CELL_TYPE_KEY, is_train=is_train))
    scores = token_gene_scores(tokens, gene_key="gene_name")
    atomic_write(out / "gene_scores.parquet", scores.to_parquet)
    top = (scores[scores["n_fire"] >= 2].sort_values(["feature_id", "freq", "n_fire"], ascending=[True, False, False])
           .groupby("feature_id").head(10).groupby("feature_id")["gene"].agg(list))
    top_lists = [top.get(i, []) for i in range(n_features)]
    joined = np.array([";".join(g) for g in top_lists], dtype=object)
    record("gene_scoring", pd.DataFrame({"top_token_genes": joined, "top_genes": joined,
                                         "n_top_genes": [len(g) for g in top_lists], "top_genes_fixed": joined},
                                        index=pd.RangeIndex(n_features, name="feature_id")))
    sets = {t: markers[t] for t in CELL_TYPES}
    enr = fisher_enrichment({i: g for i, g in enumerate(top_lists) if g}, sets, list(genes), min_size=2)
    best = enr.sort_values(["p_value", "overlap"], ascending=[True, False]).groupby("feature_id").head(1)
    best = best.set_index("feature_id").reindex(range(n_features))
    sig = enr[enr["fdr"] < 0.05]
    record("enrichment", labelled(pd.DataFrame({
        "best_set:markers": best["gene_set"].fillna("").to_numpy(), "fdr:markers": best["fdr"].fillna(1.0).to_numpy(),
        "overlap:markers": best["overlap"].fillna(0).astype(int).to_numpy(),
        "n_significant:markers": sig.groupby("feature_id").size().reindex(range(n_features)).fillna(0).astype(int)
        .to_numpy()}, index=pd.RangeIndex(n_features, name="feature_id")),
        {f"{m}:markers": ("markers", None, m) for m in ("best_set", "fdr", "overlap", "n_significant")}))
    atomic_write(out / "enrichment.csv", lambda tmp: sig.assign(collection="markers").to_csv(tmp, index=False))
    dens = density_scores(X, T)
    dens.index = pd.RangeIndex(n_features, name="feature_id")
    record("density", dens)

    # co-firing of each type's planted features: pairs, PMI, hypergeometric p, modules
    from scipy.stats import hypergeom

    B = (X > 0).astype(np.float64).tocsc()
    pairs, module_rows, module_of = [], [], np.full(n_features, -1)
    for m, t in enumerate(CELL_TYPES):
        members = sorted([type_feature[t]] + [gene_feature[g] for g in markers[t]])
        module_of[members] = m
        module_rows.append({"module": m, "size": len(members), "features": ";".join(map(str, members)),
                            f"label:{CELL_TYPE_KEY}": t, "label:markers": t})
        n_fire = np.asarray(B[:, members].sum(axis=0)).ravel()
        both = (B[:, members].T @ B[:, members]).toarray()
        for a_ in range(len(members)):
            for b_ in range(a_ + 1, len(members)):
                c, ni, nj = both[a_, b_], n_fire[a_], n_fire[b_]
                pairs.append({"i": members[a_], "j": members[b_], "count": int(c),
                              "pmi": float(np.log2(c * n_cells / (ni * nj))) if c else float("-inf"),
                              "p_value": float(hypergeom.sf(c - 1, n_cells, ni, nj))})
    pair_table = pd.DataFrame(pairs)
    pair_table["fdr"] = bh_fdr(pair_table["p_value"].to_numpy(), n_tests=n_features * (n_features - 1) // 2)
    atomic_write(out / "coactivation_pairs.csv", lambda tmp: pair_table.to_csv(tmp, index=False))
    atomic_write(out / "modules.csv", lambda tmp: pd.DataFrame(module_rows).to_csv(tmp, index=False))
    partners = np.bincount(np.concatenate([pair_table["i"], pair_table["j"]]), minlength=n_features)
    record("coactivation", pd.DataFrame({"module": module_of, "n_partners": partners},
                                        index=pd.RangeIndex(n_features, name="feature_id")))

    atomic_write_json(run_dir / "synthetic.json", {
        "seed": seed, "n_features": n_features, "n_cells": n_cells, "cell_type_key": CELL_TYPE_KEY,
        "condition_key": CONDITION_KEY, "markers": markers, "type_features": type_feature,
        "gene_features": gene_feature, "stim_feature": stim_feature})
    sae.save(run_dir, {  # cfg.json last, as training does: a run with cfg.json is finished
        "input_scaling": {"factor": 1.0, "folded": True},
        "model": OmegaConf.to_container(cfg.scfm, resolve=True), "model_family": "scgpt", "layer": layer,
        "hook_point": f"hook_resid.{layer}", "sae_hook_point": "tokens", "d_model": d_in,
        "dataset": {**OmegaConf.to_container(cfg.data, resolve=True), "name": "synthetic", "n_cells": n_cells},
        "seed": seed, "n_train_tokens": int(is_train[cell_of_token].sum()), "steps": 30,
        "synthetic": True})
    return run_dir
