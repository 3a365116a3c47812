"""Integration benchmark of a run's cells: batch correction and bio conservation (scib-metrics).

For a run whose dataset names a ``batch_key`` (e.g. ``data=pbmc_batches``), every cell of
the run's dataset is embedded in up to four spaces (``integration.embeddings``):

- ``model_cell_emb``: the model's own cell embedding, ``adapter.run(batch)["cell_emb"]`` [cells, d_emb];
- ``expression_pca``: PCA of the log-normalised expression (the run's ``data.preprocess``:
  normalize_total, log1p, HVG subset), the unintegrated baseline; it is also the
  pre-integration embedding of scib's PCR comparison, so its own PCR comparison is 0;
- ``sae_features``: ``features/features.h5ad`` (cells x SAE features, max- or mean-pooled
  over the cell's gene tokens), all features;
- ``sae_features_batch_removed``: the same without the batch-associated features, i.e. those
  whose max one-vs-rest AUROC over the batch values is > ``batch_auroc_threshold`` and > their
  max AUROC over the cell types (``sae4scfm.analysis.label_scoring`` with ``batch_key``).

SAE feature matrices are reduced to ``sae_n_comps`` dims by TruncatedSVD (no centring, so the
sparse matrix is never densified; random_state 0) before the metrics, like the PCA baseline,
so that the kNN metrics compare spaces of similar dimension; ``sae_n_comps: null`` keeps the
raw activations. Each embedding is then scored by ``scib_metrics.benchmark.Benchmarker``
(scIB's bio-conservation and batch-correction metrics; its 15/50/90-NN graphs by exact
Euclidean search instead of pynndescent; kBET's own diffusion-map kNN stays pynndescent,
seeded) into one table, written to ``<run>/analysis/integration.csv``: index ``embedding``,
two-level columns ``(metric type, metric)`` with types ``Bio conservation``,
``Batch correction``, ``Aggregate score`` (per-type means and ``Total`` = 0.4 batch + 0.6 bio,
scIB's weighting; unscaled) and ``Embedding`` (``dims`` benchmarked, ``features`` = SAE
features used). Metrics lie in [0, 1] (KMeans ARI can dip below 0), higher is better.

``integration.batch_key`` names another obs column as the batch (e.g. ``stim`` on ``data=kang``);
``integration.cells`` scores all labelled cells or only the run's held-out (eval) cells.

Feature removal by selection (``integration.removal.enabled``, ``sae4scfm.causal.removal``): for each n of
``n_features_list`` the top-n SAE features by a label score on the TRAIN cells (default: max AUROC over the
batch key) are zeroed inside the model at the SAE's layer and the steered ``cell_emb`` is benchmarked as the
row ``model_cell_emb_removed_n{n}``, beside ``model_cell_emb_random_n{n}_s{seed}`` (n random features
matched on train firing density, one draw per seed) and the unsteered ``model_cell_emb``; with removal the
table scores the eval cells by default (``integration.cells: null``), none of which the selection saw.

Needs the optional ``scib-metrics`` package (and with it jax): ``pip install "sae4scfm[integration]"``.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from omegaconf import DictConfig, OmegaConf

from sae4scfm.analysis.labels import label_scoring
from sae4scfm.analysis.primitives import as_matrix
from sae4scfm.analysis.run_data import check_run_features, read_run_features
from sae4scfm.atomic import atomic_write
from sae4scfm.data import describe, highly_variable, normalise_expression
from sae4scfm.errors import InputError
from sae4scfm.runs import load_run_config, resolve_run_dir
from sae4scfm.scfm import ScFMAdapter
from sae4scfm.scfm.tokens import TokenizedCells

EMBEDDINGS = ("model_cell_emb", "expression_pca", "sae_features", "sae_features_batch_removed")
PIP_FIX = 'pip install "sae4scfm[integration]" (or: pip install "scib-metrics>=0.5.10,<0.6")'
N_NEIGHBORS = 90  # the largest kNN graph scib's metrics use (LISI); the 15- and 50-NN graphs are its prefixes
RESULT_FILE = "integration.csv"
REMOVAL_FILE = "integration_removal.csv"  # removed vs random, per n and metric
REMOVAL_SETS_FILE = "integration_removal_sets.csv"  # the features removed in each row
CELLS = ("all", "eval")


def require_scib_metrics() -> None:
    """``InputError`` naming the pip command when scib-metrics is not installed."""
    try:
        missing = importlib.util.find_spec("scib_metrics") is None
    except ValueError:  # a module object without a spec (e.g. set to None in sys.modules)
        missing = True
    if missing:
        raise InputError(f"the integration benchmark needs the optional package scib-metrics (with jax); "
                         f"install it with: {PIP_FIX}")


# --------------------------------------------------------------------------- embeddings


@torch.no_grad()
def model_cell_embeddings(adapter: ScFMAdapter, tokens: TokenizedCells, n_cells: int,
                          batch_size: int) -> np.ndarray:
    """The model's ``cell_emb`` of every tokenized cell: float32 [n_cells, d_emb], row = AnnData row."""
    emb = None
    filled = np.zeros(n_cells, dtype=bool)
    for batch in tokens.batches(adapter.cells_per_batch(batch_size)):
        out = adapter.run(batch)["cell_emb"].float().cpu().numpy()
        if emb is None:
            emb = np.zeros((n_cells, out.shape[1]), dtype=np.float32)
        rows = batch.cell_index.numpy()
        emb[rows] = out
        filled[rows] = True
    if emb is None or not filled.all():
        raise InputError(f"{n_cells - int(filled.sum())} of the run's {n_cells} cells have no tokens, so no "
                         "model cell embedding; filter out cells without expressed vocabulary genes.")
    return emb


def expression_pca(adata: ad.AnnData, data_cfg: DictConfig, n_comps: int) -> np.ndarray:
    """PCA [cells, <= n_comps] (scanpy, arpack, random_state 0) of the log-normalised expression
    with the run's ``data.preprocess`` settings (HVG subset included)."""
    import scanpy as sc

    pp = data_cfg.preprocess
    X = normalise_expression(sp.csr_matrix(adata.X), pp.input_kind, pp.normalize_total, pp.log1p,
                             describe(data_cfg))
    if pp.subset_hvg:
        X = X[:, highly_variable(X, int(pp.n_hvg))]
    n_comps = max(1, min(int(n_comps), X.shape[0] - 1, X.shape[1] - 1))
    return np.asarray(sc.pp.pca(X, n_comps=n_comps, random_state=0, svd_solver="arpack"), dtype=np.float32)


def sae_embedding(features_X, n_comps: int | None) -> np.ndarray:
    """SAE activations [cells, features] as a dense float32 embedding [cells, n_comps]: TruncatedSVD
    (random_state 0); the raw activations when ``n_comps`` is None or not below min(cells, features) - 1."""
    from sklearn.decomposition import TruncatedSVD

    X = as_matrix(features_X, "features_X", dtype=np.float32)
    if n_comps is None or n_comps >= min(X.shape) - 1:
        return X.toarray()
    return TruncatedSVD(n_components=int(n_comps), random_state=0).fit_transform(X).astype(np.float32)


def batch_associated_features(features_X, obs: pd.DataFrame, batch_key: str, cell_type_key: str, *,
                              min_cells: int, batch_auroc_threshold: float) -> np.ndarray:
    """Bool [n_features]: the ``batch_associated`` flag of ``label_scoring``."""
    scores = label_scoring(features_X, obs, [], min_cells=min_cells, batch_key=batch_key,
                           cell_type_key=cell_type_key, batch_auroc_threshold=batch_auroc_threshold)
    return scores["batch_associated"].to_numpy(dtype=bool)


# --------------------------------------------------------------------------- metrics


def knn_exact(X: np.ndarray, k: int):
    """scib's NeighborsResults of a Euclidean kNN search (``labels.nearest_neighbors``: exact ball tree up to
    its size limit, pynndescent above; each cell is its own first neighbour)."""
    from scib_metrics.nearest_neighbors import NeighborsResults

    from sae4scfm.analysis.labels import nearest_neighbors

    distances, indices = nearest_neighbors(X, k)
    return NeighborsResults(indices=indices, distances=distances)


def scib_table(obs: pd.DataFrame, embeddings: dict[str, np.ndarray], batch_key: str, label_key: str, *,
               pre_integrated: np.ndarray, bio_conservation: dict, batch_correction: dict) -> pd.DataFrame:
    """scib-metrics of each embedding: DataFrame [embeddings, (metric type, metric)], unscaled.

    obs: [cells, ...] with ``batch_key`` and ``label_key``; embeddings: name -> [cells, dims];
    pre_integrated: [cells, dims] unintegrated embedding (PCA of the expression), the reference
    of the PCR comparison.
    bio_conservation / batch_correction: metric name -> bool (or keyword args), as
    ``scib_metrics.benchmark.BioConservation`` / ``BatchCorrection`` take them.
    """
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    try:
        bio, batch = BioConservation(**bio_conservation), BatchCorrection(**batch_correction)
    except TypeError as e:
        raise InputError(f"integration.bio_conservation / integration.batch_correction: {e}; the metric names "
                         "are the fields of scib_metrics.benchmark.BioConservation / BatchCorrection.") from e
    holder = ad.AnnData(obs=obs[[batch_key, label_key]].copy())
    holder.obsm["_pre"] = pre_integrated
    rows = []
    for i, (name, emb) in enumerate(embeddings.items(), 1):
        print(f"[{i}/{len(embeddings)}] scib-metrics of {name} ({emb.shape[1]} dims) ...", flush=True)
        start = time.perf_counter()
        holder.obsm[name] = emb
        bench = Benchmarker(holder, batch_key, label_key, [name], bio_conservation_metrics=bio,
                            batch_correction_metrics=batch, pre_integrated_embedding_obsm_key="_pre",
                            progress_bar=False)
        bench.prepare(neighbor_computer=knn_exact)
        bench.benchmark()
        res = bench.get_results(min_max_scale=False)
        types = res.loc["Metric Type"]
        res = res.drop(index="Metric Type").astype(np.float64)
        res.columns = pd.MultiIndex.from_arrays([types.to_numpy(), res.columns])
        rows.append(res)
        print(f"      done in {time.perf_counter() - start:.1f} s", flush=True)
    table = pd.concat(rows)
    table.index.name = "embedding"
    table.columns.names = ["metric type", "metric"]
    return table


# --------------------------------------------------------------------------- entry point


@dataclass
class RunFeatures:
    """``features/features.h5ad`` of a run, checked against the run."""

    X: sp.csr_matrix  # [cells, d_sae] pooled activations
    adata: ad.AnnData  # features.h5ad itself (obs: the cells)
    path: Path


def read_pooled_features(run_dir: Path, pooling: str) -> RunFeatures:
    """The run's pooled SAE features (``sae4scfm.analysis.run_data.read_run_features``)."""
    from sae4scfm.features.generate import cell_representation

    features = read_run_features(run_dir)
    path = run_dir / "features" / "features.h5ad"
    X = cell_representation(features, pooling, f"integration.pooling={pooling!r}: {path}")
    return RunFeatures(as_matrix(X, str(path), dtype=np.float32), features, path)


def scored_cells(adata: ad.AnnData, batch_key: str, label_key: str, cells: str, data_cfg: DictConfig) -> np.ndarray:
    """bool [n_obs]: the cells the table scores: labelled (``batch_key`` and ``label_key`` set), and with
    ``cells="eval"`` only the run's held-out cells (``obs["split"]``)."""
    if cells not in CELLS:
        raise InputError(f"integration.cells={cells!r} is unknown; use all or eval (or null).")
    usable = adata.obs[[batch_key, label_key]].notna().all(axis=1).to_numpy()
    if not usable.all():
        print(f"{int((~usable).sum())} cells without {batch_key!r} or {label_key!r} are left out")
    which = "labelled"
    if cells == "eval":
        usable &= adata.obs["split"].astype(str).to_numpy() == "eval"
        which = "labelled eval (held-out)"
    if usable.sum() <= N_NEIGHBORS:
        raise InputError(f"{describe(data_cfg)}: {int(usable.sum())} {which} cells; scib's kNN metrics need "
                         f"more than {N_NEIGHBORS}: use more cells (data.n_cells"
                         f"{', a larger data.preprocess.split, or integration.cells=all' if cells == 'eval' else ''}).")
    if adata.obs.loc[usable, batch_key].nunique() < 2:
        raise InputError(f"batch key {batch_key!r}: the scored cells come from a single batch; "
                         "batch-correction metrics need at least two.")
    return usable


def removal_plan(icfg: DictConfig, features: RunFeatures, batch_key: str, cell_type_key: str
                 ) -> tuple[list, pd.DataFrame]:
    """The ``integration.removal`` sets (``sae4scfm.causal.removal.removal_sets``), selected on the run's train
    cells of ``features.h5ad``, and a table of them: row ``embedding``, kind, n, seed, features (ids), and the
    mean selection score of the set's features on the train cells and, held out, on the eval cells."""
    from sae4scfm.analysis.labels import train_mask
    from sae4scfm.causal.removal import removal_sets, selection_scores

    r = icfg.removal
    obs = features.adata.obs
    key, train = str(r.label_key or batch_key), train_mask(obs, str(features.path))
    common = dict(rule=str(r.selection), cell_type_key=cell_type_key, min_cells=int(icfg.min_cells),
                  field="integration.removal.label_key" if r.label_key else "integration.batch_key")
    sets, score = removal_sets(features.X, obs, train, key, list(r.n_features_list), list(r.seeds), **common)
    try:
        held_out = selection_scores(features.X, obs, ~train, key, **common)
    except InputError as err:  # e.g. a label value with too few eval cells: the score is then not reported
        print(f"  no eval-cell selection score: {err}")
        held_out = np.full_like(score, np.nan)
    info = pd.DataFrame([{"embedding": s.name, "kind": s.kind, "n": s.n, "seed": s.seed,
                          "features": " ".join(map(str, s.features)),
                          "train_score": float(score[list(s.features)].mean()) if s.n else np.nan,
                          "eval_score": float(held_out[list(s.features)].mean()) if s.n else np.nan} for s in sets])
    for s, row in zip(sets, info.itertuples()):
        if s.kind == "removed":
            print(f"  removal n={s.n}: the top features by {r.selection} over {key} on train cells (mean score "
                  f"{row.train_score:.3f}, on eval cells {row.eval_score:.3f}): "
                  f"{' '.join(map(str, s.features[:20]))}{' ...' if s.n > 20 else ''}")
    return sets, info


def removal_embeddings(icfg: DictConfig, ctx, sets: list, usable: np.ndarray, clean: np.ndarray) -> dict[str, np.ndarray]:
    """{row name: the cell_emb of the scored cells [cells, d_emb] with the set's features zeroed at the SAE's
    layer}. ``clean``: the unsteered cell_emb of those cells, to tell a removal that cannot reach the cell
    embedding (InputError)."""
    from sae4scfm.causal.removal import removed_embeddings

    positions = np.flatnonzero(usable[np.asarray(ctx.tokens.cell_index)])
    steered = removed_embeddings(ctx.adapter, ctx.sae, ctx.layer, ctx.tokens.subset(positions), sets,
                                 len(usable), mode=str(icfg.removal.mode), batch_size=int(icfg.batch_size),
                                 per_forward=int(icfg.removal.per_forward))
    steered = {name: emb[usable] for name, emb in steered.items()}
    if any(s.n for s in sets) and all(np.array_equal(steered[s.name], clean) for s in sets if s.n):
        raise InputError(f"removing SAE features at layer {ctx.layer} changed no cell embedding: the model's "
                         "cell_emb does not depend on the gene tokens there (e.g. the <cls> state at the last "
                         "layer); use a run whose SAE reads an earlier layer.")
    return steered


def benchmark_integration(cfg: DictConfig) -> pd.DataFrame:
    """Score a run's cells in the spaces of ``cfg.integration.embeddings`` (and, with
    ``integration.removal.enabled``, the model's cell embedding with selected SAE features removed, beside
    density-matched random removals) with scib-metrics; prints the table and writes it to
    ``<run>/analysis/integration.csv`` (with removal also ``integration_removal.csv``: removed vs random per n
    and metric, and ``integration_removal_sets.csv``: the features of each row)."""
    from sae4scfm.scfm.loading import load_model_and_data, pick_device

    icfg = cfg.integration
    removal = icfg.removal
    run_dir = resolve_run_dir(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp)
    run_cfg = load_run_config(run_dir)
    data_cfg = run_cfg.data
    batch_key, label_key = icfg.get("batch_key") or data_cfg.get("batch_key"), data_cfg.get("cell_type_key")
    if not batch_key:
        raise InputError(f"{run_dir}: the run's dataset ({describe(data_cfg)}) has no data.batch_key, so there is "
                         "no batch effect to benchmark; train on data with batches (e.g. data=pbmc_batches, or "
                         "data=h5ad data.batch_key=<obs column>), or name one: integration.batch_key=<obs column>.")
    if not label_key:
        raise InputError(f"{run_dir}: the run's dataset ({describe(data_cfg)}) has no data.cell_type_key; bio "
                         "conservation needs cell-type labels: train with data.cell_type_key=<obs column>.")
    names = list(icfg.embeddings)
    unknown = [n for n in names if n not in EMBEDDINGS]
    if unknown or not names:
        raise InputError(f"integration.embeddings={names}: choose one or more of {list(EMBEDDINGS)}.")
    if removal.enabled and "model_cell_emb" not in names:
        names.insert(0, "model_cell_emb")  # the unsteered row beside the removals
    cells = icfg.get("cells") or ("eval" if removal.enabled else "all")
    wants_sae = removal.enabled or any(n.startswith("sae_") for n in names)
    features = read_pooled_features(run_dir, str(icfg.pooling)) if wants_sae else None
    require_scib_metrics()
    sets, info = removal_plan(icfg, features, batch_key, label_key) if removal.enabled else ([], None)

    if removal.enabled:
        from sae4scfm.causal.run import open_causal_run

        ctx = open_causal_run(cfg, "integration.removal")
        adapter, adata, tokens = ctx.adapter, ctx.adata, ctx.tokens
    else:
        adapter, adata, tokens = load_model_and_data(run_cfg, pick_device(cfg.device))
    if features is not None:
        check_run_features(run_dir, features.adata, adata)
    if batch_key not in adata.obs:
        raise InputError(f"integration.batch_key={batch_key!r} is not an obs column of {describe(data_cfg)}; use one "
                         f"of {', '.join(map(str, adata.obs.columns))}.")
    usable = scored_cells(adata, batch_key, label_key, cells, data_cfg)
    obs = adata.obs.loc[usable]

    embeddings: dict[str, np.ndarray] = {}
    n_features: dict[str, int] = {}  # SAE features behind each SAE embedding
    for name in names:
        print(f"embedding: {name}", flush=True)
        if name == "model_cell_emb":
            emb = model_cell_embeddings(adapter, tokens, adata.n_obs, int(icfg.batch_size))[usable]
        elif name == "expression_pca":
            emb = expression_pca(adata[usable], data_cfg, int(icfg.pca_n_comps))
        else:
            X = features.X[usable]
            if name == "sae_features_batch_removed":
                flag = batch_associated_features(X, obs, batch_key, label_key, min_cells=int(icfg.min_cells),
                                                 batch_auroc_threshold=float(icfg.batch_auroc_threshold))
                print(f"  removing {int(flag.sum())} batch-associated features of {X.shape[1]} "
                      f"(max AUROC over {batch_key} > {float(icfg.batch_auroc_threshold)} and > over {label_key})")
                X = X[:, ~flag]
            emb = sae_embedding(X, icfg.sae_n_comps)
            n_features[name] = X.shape[1]
        embeddings[name] = emb
    if sets:
        print(f"embedding: model_cell_emb with SAE features removed (layer {ctx.layer}, {removal.mode})", flush=True)
        clean = embeddings["model_cell_emb"]
        embeddings.update(removal_embeddings(icfg, ctx, sets, usable, clean))
        info["emb_shift"] = [float(np.mean(np.linalg.norm(embeddings[name] - clean, axis=1)
                                           / np.linalg.norm(clean, axis=1))) for name in info["embedding"]]
    reference = embeddings.get("expression_pca")  # PCR comparison's unintegrated reference
    if reference is None:
        reference = expression_pca(adata[usable], data_cfg, int(icfg.pca_n_comps))
    table = scib_table(obs, embeddings, batch_key, label_key, pre_integrated=reference,
                       bio_conservation=OmegaConf.to_container(icfg.bio_conservation),
                       batch_correction=OmegaConf.to_container(icfg.batch_correction))
    table[("Embedding", "dims")] = [embeddings[n].shape[1] for n in table.index]
    table[("Embedding", "features")] = [n_features.get(n, np.nan) for n in table.index]

    out_dir = run_dir / "analysis"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / RESULT_FILE
    if sets:
        removed = {s.name: s.n for s in sets}
        table[("Embedding", "removed")] = [removed.get(n, np.nan) for n in table.index]
        write_removal(out_dir, table, sets, info)
    atomic_write(out, lambda p: table.to_csv(p))
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        print(table)
    print(f"integration benchmark ({batch_key} x {label_key}, {len(obs)} {cells} cells): {out}")
    return table


def write_removal(out_dir: Path, table: pd.DataFrame, sets: list, info: pd.DataFrame) -> None:
    """``integration_removal_sets.csv`` (``info``: row, kind, n, seed, features removed, their mean train / eval
    selection score, emb_shift = mean ‖Δ cell_emb‖ / ‖cell_emb‖ over the scored cells) and
    ``integration_removal.csv`` (per n and score: removed, random mean / sd, empirical p that a random removal
    scores as high); printed."""
    from sae4scfm.causal.removal import against_random

    atomic_write(out_dir / REMOVAL_SETS_FILE, lambda p: info.to_csv(p, index=False))
    metrics = [c for c in table.columns if c[0] != "Embedding"]
    summary = against_random(table, sets, metrics)
    atomic_write(out_dir / REMOVAL_FILE, lambda p: summary.to_csv(p, index=False))
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        print(info.drop(columns="features").to_string(index=False))
        print(summary[summary["metric type"] == "Aggregate score"].to_string(index=False))
    print(f"feature removal vs density-matched random removal: {out_dir / REMOVAL_FILE}")


def read_integration_table(path: str | Path) -> pd.DataFrame:
    """``integration.csv`` as written by ``benchmark_integration`` (two header rows)."""
    return pd.read_csv(path, header=[0, 1], index_col=0)
