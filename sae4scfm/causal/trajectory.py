"""Trajectory steering: does editing SAE features in cells at the start of a lineage (or state transition) move
the model's output toward the cells at its end?

1. Pseudotime: scanpy's diffusion pseudotime on the cells whose ``label_key`` is one of the ``lineage`` values
   (all splits; labels are used only to restrict the cells and to pick the root): log1p(CP10k) expression of the
   genes the model saw → PCA → kNN graph → ``sc.tl.diffmap`` → ``sc.tl.dpt``, all seeded. Root (scanpy's docs: a
   cell at an extreme of the first diffusion component): among cells of the FIRST lineage value, the one at the
   end of diffusion component 1 (``X_diffmap[:, 1]``; column 0 is the trivial stationary component) that lies
   away from the mean of the LAST value's cells. Early / late = pseudotime at or below / at or above the
   ``early_quantile`` / ``late_quantile`` of the lineage cells.
2. Signature (train cells): per vocabulary gene g, late − early difference of the clean model's mean per-gene
   readout (``steering.readout``/``default_output``); the signature genes are the ``n_signature_genes`` largest
   |difference| among genes seen in >= ``min_cells`` early and late train cells.
3. Features: ``features`` given, or the ``n_features`` largest |Spearman ρ| of a feature's cell activation with
   pseudotime on train lineage cells, among features that fire there. Sign-aware: a feature with ρ > 0 is
   added (+α), one with ρ < 0 reduced (−α), in units of its mean activation where it fires (train lineage cells).
4. Steering: each feature alone and all of them together (``set``), for each α of ``alphas``, in early EVAL
   cells (``interventions.stacked_run`` on the cached prefix). Scores, oriented to the end the edit aims at
   (late for α > 0, early for α < 0; all "higher = further toward the aim"): ``signature_r``, Pearson r of the
   per-gene mean readout change with sign(α)·signature over the signature genes; ``progress``, the projection
   Σ Δ_g·s_g / Σ s_g² (1 = the early→late gap crossed); ``closer_fraction``, the fraction of steered cells whose
   readout on its signature genes is closer (squared distance) to the aimed centroid than the unsteered cell's;
   ``emb_closer_fraction``, the same for the cell embedding and the aimed train centroid. Null: for each feature
   ``null_features`` features matched on firing density (``steering.matched_null``) with the same signed α, and
   as many null sets; empirical p and BH q (``steering.against_null``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from sae4scfm.causal.interventions import Intervention, clean_prefix, resid_layer, stacked_run
from sae4scfm.causal.steering import GeneShifts, default_output, readout
from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import HookPointName, ScFMAdapter
from sae4scfm.scfm.tokens import TokenizedCells

METRICS = ["signature_r", "progress", "closer_fraction", "emb_closer_fraction"]


def lineage_positions(labels: np.ndarray, lineage, field: str, min_cells: int) -> np.ndarray:
    """Indices of the cells whose label [C] is a ``lineage`` value; InputError for a lineage of < 2 distinct
    values, a value absent from the labels, or fewer than ``min_cells`` cells in all."""
    values = [str(v) for v in (lineage or ())]
    if len(set(values)) < 2:
        raise InputError(f"{field}={values}: a lineage needs at least 2 distinct label values in order, start first "
                         "(e.g. trajectory.lineage=[CTRL,STIM] with trajectory.label_key=stim).")
    present = set(labels)
    missing = [v for v in values if v not in present]
    if missing:
        raise InputError(f"{field}: {missing} not among the label values; values: {', '.join(sorted(present))}.")
    pos = np.flatnonzero(np.isin(labels, values))
    if len(pos) < min_cells:
        raise InputError(f"{field}={values}: only {len(pos)} cells, fewer than trajectory.min_lineage_cells="
                         f"{min_cells}; add lineage values, use more cells (data.n_cells) or lower min_lineage_cells.")
    return pos


def diffusion_pseudotime(X, labels: np.ndarray, lineage, *, n_pcs: int = 30, n_neighbors: int = 15,
                         n_dcs: int = 10, method: str = "gauss", seed: int = 0) -> tuple[np.ndarray, int, np.ndarray]:
    """(pseudotime [C] in [0, 1], inf where unreachable; root index; diffusion component 1 [C]) of the cells of
    ``X`` [C, genes] (log expression, dense or CSR) with labels [C]: PCA, kNN graph (``method``: scanpy's
    ``gauss`` kernel of Haghverdi et al. 2016, DPT's own, or ``umap``), ``sc.tl.diffmap``, root by the module's
    rule, ``sc.tl.dpt``."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=X.astype(np.float32))
    sc.pp.pca(a, n_comps=int(min(n_pcs, a.n_obs - 1, a.n_vars - 1)), random_state=seed)
    sc.pp.neighbors(a, n_neighbors=int(n_neighbors), use_rep="X_pca", method=method, random_state=seed)
    sc.tl.diffmap(a, n_comps=int(n_dcs) + 1)
    dc1 = a.obsm["X_diffmap"][:, 1].astype(np.float64)
    first, last = labels == str(lineage[0]), labels == str(lineage[-1])
    cand = np.flatnonzero(first)
    root = int(cand[np.argmin(dc1[cand])] if dc1[last].mean() > dc1[first].mean() else cand[np.argmax(dc1[cand])])
    a.uns["iroot"] = root
    sc.tl.dpt(a, n_dcs=int(n_dcs))
    return a.obs["dpt_pseudotime"].to_numpy(np.float64), root, dc1


def pseudotime_correlation(features, pseudotime: np.ndarray) -> np.ndarray:
    """Spearman ρ [d_sae] of each feature's activation over cells (``features`` [C, d_sae], dense or CSR) with
    ``pseudotime`` [C]; NaN for features constant on these cells."""
    X = features.toarray() if hasattr(features, "toarray") else np.asarray(features)
    rx = stats.rankdata(X, axis=0)
    rt = stats.rankdata(pseudotime)
    rx, rt = rx - rx.mean(0), rt - rt.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * rt[:, None]).sum(0) / np.sqrt((rx ** 2).sum(0) * (rt ** 2).sum())


@dataclass
class EndPoints:
    """Clean per-gene readout means of the early / late train cells (``mean`` [2, V], NaN where unseen; row 0
    early, 1 late), cells per gene ``count`` [2, V], cell-embedding centroids ``emb`` [2, d] (None without a
    cell embedding) and the signature genes ``genes`` [V] bool."""

    mean: np.ndarray
    count: np.ndarray
    emb: np.ndarray | None
    genes: np.ndarray

    @property
    def signature(self) -> np.ndarray:
        """late − early [V] (NaN where either end never saw the gene)."""
        return self.mean[1] - self.mean[0]


def end_points(early_sum: np.ndarray, early_count: np.ndarray, late_sum: np.ndarray, late_count: np.ndarray,
               emb: np.ndarray | None, n_genes: int, min_cells: int) -> EndPoints:
    """``EndPoints`` from per-gene readout sums and counts [V] of each end; signature genes = the ``n_genes``
    largest |late − early| among genes seen in >= ``min_cells`` cells at both ends."""
    count = np.stack([early_count, late_count])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.stack([early_sum, late_sum]) / count
    mean[count == 0] = np.nan
    diff = mean[1] - mean[0]
    ok = np.flatnonzero((count >= min_cells).all(0) & np.isfinite(diff))
    genes = np.zeros(len(diff), dtype=bool)
    genes[ok[np.argsort(-np.abs(diff[ok]), kind="stable")[:n_genes]]] = True
    return EndPoints(mean, count, emb, genes)


@torch.no_grad()
def trajectory_shifts(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, tokens: TokenizedCells,
                      interventions: list[Intervention], ends: EndPoints, *, output: str | None = None,
                      mode: str = "error_preserving", batch_size: int = 8, per_forward: int = 16
                      ) -> tuple[GeneShifts, np.ndarray, np.ndarray, str]:
    """Run every intervention on every cell of ``tokens`` (stacked, from the cached prefix) and return
    (GeneShifts of the per-gene readout change, closer [E, 2, C], emb_closer [E, 2, C], output key): closer[e, k, c]
    is 1 when cell c's steered readout on its signature genes is nearer (squared distance) to end k's mean
    (0 early, 1 late) than its clean readout, 0 when not, NaN when the cell holds no signature gene; emb_closer the
    same for the cell embedding and ``ends.emb`` (NaN without one)."""
    E, V, C = len(interventions), len(adapter.vocab), len(tokens)
    n, total, squares = (np.zeros((E, V)) for _ in range(3))
    embedding = np.zeros((E, C))
    closer, emb_closer = np.full((E, 2, C), np.nan), np.full((E, 2, C), np.nan)
    dev = adapter.device
    centroid = torch.as_tensor(np.nan_to_num(ends.mean), dtype=torch.float32, device=dev)  # [2, V]
    in_sig = torch.as_tensor(ends.genes, device=dev)
    emb_c = None if ends.emb is None else torch.as_tensor(ends.emb, dtype=torch.float32, device=dev)
    done = 0
    with tqdm(total=C * E, desc="trajectory steering", unit="cell·edit") as bar:
        for batch in tokens.batches(adapter.cells_per_batch(batch_size), sort_by_length=False):
            batch = batch.to(dev)
            B = len(batch.cell_index)
            clean = adapter.run(batch)
            prefix = clean_prefix(adapter, hook_point, batch)
            output = output or default_output(clean, last_layer=resid_layer(hook_point) == adapter.n_layers)
            base = readout(clean, output, batch.gene_ids).float()
            gids = batch.gene_ids.to(dev)
            w = (batch.gene_mask.to(dev) & in_sig[gids]).float()  # [B, T] signature-gene tokens
            has = (w.sum(1) > 0).cpu().numpy()
            target = centroid[:, gids]  # [2, B, T]
            d_clean = (((base[None] - target) ** 2) * w).sum(-1)  # [2, B]
            ids = batch.gene_ids[batch.gene_mask].cpu().numpy()
            for start in range(0, E, per_forward):
                chunk = interventions[start:start + per_forward]
                out = stacked_run(adapter, sae, hook_point, batch, chunk, mode=mode, prefix=prefix)
                for c in range(len(chunk)):
                    e = start + c
                    steered = readout({k: v[c] for k, v in out.items()}, output, batch.gene_ids).float()
                    delta = (steered - base)[batch.gene_mask].double().cpu().numpy()
                    np.add.at(n[e], ids, 1)
                    np.add.at(total[e], ids, delta)
                    np.add.at(squares[e], ids, delta ** 2)
                    d = (((steered[None] - target) ** 2) * w).sum(-1)
                    closer[e, :, done:done + B] = np.where(has, (d < d_clean).cpu().numpy(), np.nan)
                    if "cell_emb" in out:
                        emb, emb0 = out["cell_emb"][c].float(), clean["cell_emb"].float()
                        embedding[e, done:done + B] = (emb - emb0).norm(dim=-1).cpu().numpy()
                        if emb_c is not None:
                            nearer = torch.cdist(emb, emb_c) < torch.cdist(emb0, emb_c)  # [B, 2]
                            emb_closer[e, :, done:done + B] = nearer.T.cpu().numpy()
                bar.update(B * len(chunk))
            done += B
    return GeneShifts(n, total, squares, embedding), closer, emb_closer, output


def toward_scores(shifts: GeneShifts, closer: np.ndarray, emb_closer: np.ndarray, e: int, alpha: float,
                  ends: EndPoints, min_cells: int) -> dict[str, float]:
    """The module's four scores of intervention ``e`` oriented to the aimed end (late for α > 0, early for α < 0):
    signature_r, progress (over signature genes with >= ``min_cells`` steered cells), closer_fraction,
    emb_closer_fraction; plus n_signature_genes (genes scored)."""
    aim = 1 if alpha >= 0 else 0
    sig = ends.signature * (1.0 if alpha >= 0 else -1.0)
    genes = np.flatnonzero(ends.genes & (shifts.n[e] >= min_cells))
    delta = shifts.total[e, genes] / np.maximum(shifts.n[e, genes], 1)
    s = sig[genes]
    r = float(stats.pearsonr(delta, s).statistic) if len(genes) > 2 and delta.std() > 0 else np.nan
    progress = float(delta @ s / (s @ s)) if len(genes) and s @ s > 0 else np.nan

    def frac(x):
        x = x[e, aim]
        x = x[np.isfinite(x)]
        return float(x.mean()) if len(x) else np.nan

    return {"signature_r": r, "progress": progress, "closer_fraction": frac(closer),
            "emb_closer_fraction": frac(emb_closer), "n_signature_genes": int(len(genes))}


# --------------------------------------------------------------------------- the stage


def trajectory_steering(cfg) -> pd.DataFrame:
    """``scripts/trajectory_steering.py``: ``steer_trajectory`` on the run addressed by ``cfg.sae_checkpoint``."""
    from sae4scfm.causal.run import open_causal_run

    return steer_trajectory(open_causal_run(cfg, "trajectory steering"), cfg.trajectory)


def steer_trajectory(ctx, t) -> pd.DataFrame:
    """Pseudotime on ``t.lineage`` (``t``: the ``trajectory`` config section), early/late signature on train
    cells, features chosen on train cells, steered in early eval cells of the opened run ``ctx``
    (``causal.run.CausalRun``), scored toward late against the matched null (module docstring). Writes
    ``<run>/causal/trajectory/{trajectory.csv (features vs null), set.csv (all features together vs null sets),
    null.csv, pseudotime.csv, signature.csv}``; returns trajectory.csv's table."""
    from sae4scfm.atomic import atomic_write
    from sae4scfm.causal.contrastive import type_profiles
    from sae4scfm.causal.steering import _vocab_names, against_null, check_moved, firing_stats, matched_null

    for name in ("early_quantile", "late_quantile"):
        if not 0 < float(t[name]) < 1:
            raise InputError(f"trajectory.{name}={t[name]} must lie strictly between 0 and 1.")
    if float(t.early_quantile) >= float(t.late_quantile):
        raise InputError(f"trajectory.early_quantile={t.early_quantile} must be below trajectory.late_quantile="
                         f"{t.late_quantile}.")
    run, sae, layer, adapter = ctx.run, ctx.sae, ctx.layer, ctx.adapter
    key, labels = ctx.labels(t.label_key, "trajectory.label_key")
    if labels is None:
        raise InputError("trajectory steering needs cell labels: set trajectory.label_key=<obs column>.")
    labels = labels.to_numpy()
    bad = [int(j) for j in (t.features or ()) if not 0 <= int(j) < sae.d_sae]
    if bad:
        raise InputError(f"trajectory.features: feature ids {bad} are out of range; this SAE has features "
                         f"0..{sae.d_sae - 1}.")
    lineage = [str(v) for v in (t.lineage or ())]
    cells = lineage_positions(labels, lineage, "trajectory.lineage", int(t.min_lineage_cells))
    rng = np.random.default_rng(int(t.seed))

    run.cache.setdefault("adata", ctx.adata)  # the loaded cells, not a second read
    X, _ = run.expression()
    pt, root, dc1 = diffusion_pseudotime(X[cells], labels[cells], lineage, n_pcs=int(t.n_pcs),
                                         n_neighbors=int(t.n_neighbors), n_dcs=int(t.n_dcs),
                                         method=str(t.neighbors_method), seed=int(t.seed))
    reach = np.isfinite(pt)
    q_early, q_late = np.quantile(pt[reach], [float(t.early_quantile), float(t.late_quantile)])
    phase = np.where(~reach, "unreached", np.where(pt <= q_early, "early", np.where(pt >= q_late, "late", "mid")))
    split = ctx.adata.obs["split"].astype(str).to_numpy()[cells]
    n_cells, min_cells = int(t.n_cells), int(t.min_cells)

    def sample(ph: str, part: str) -> np.ndarray:
        pos = np.flatnonzero((phase == ph) & (split == part))
        if len(pos) < max(min_cells, 2):
            raise InputError(f"trajectory.lineage={lineage}: only {len(pos)} {ph} {part} cells (pseudotime "
                             f"quantile {t.early_quantile if ph == 'early' else t.late_quantile}); use more cells "
                             "(data.n_cells) or wider trajectory.early_quantile / late_quantile.")
        return cells[np.sort(rng.choice(pos, min(n_cells, len(pos)), replace=False))]

    early_train, late_train, early_eval = sample("early", "train"), sample("late", "train"), sample("early", "eval")
    train_lineage = cells[(split == "train") & reach]
    stats_cells = np.sort(rng.choice(train_lineage, min(n_cells, len(train_lineage)), replace=False))
    density, scale = firing_stats(adapter, sae, layer, ctx.tokens.subset(stats_cells), int(t.batch_size))

    # features: given, or the largest |Spearman rho| with pseudotime on train lineage cells (live features only)
    rho, rho_eval = (pseudotime_correlation(run.features.X[cells[(split == part) & reach]], pt[(split == part) & reach])
                     for part in ("train", "eval"))
    if t.features is not None:
        targets = [int(j) for j in t.features]
        silent = [j for j in targets if density[j] == 0]
        if silent:
            raise InputError(f"trajectory.features: {silent} never fire on the {len(stats_cells)} train lineage "
                             "cells, so their activation scale is undefined; choose other features.")
    else:
        score = np.where((density > 0) & np.isfinite(rho), np.abs(rho), -1.0)
        targets = [int(j) for j in np.argsort(-score, kind="stable")[:int(t.n_features)] if score[j] >= 0]
    sign = {j: (1.0 if not np.isfinite(rho[j]) or rho[j] >= 0 else -1.0) for j in targets}

    probe_batch = ctx.tokens.subset(early_train[:1]).collate(np.arange(1))
    probe = adapter.run(probe_batch.to(adapter.device))
    output = t.output or default_output(probe, last_layer=layer == adapter.n_layers)
    emb_e, sum_e, cnt_e = type_profiles(adapter, ctx.tokens.subset(early_train), output, int(t.batch_size))
    emb_l, sum_l, cnt_l = type_profiles(adapter, ctx.tokens.subset(late_train), output, int(t.batch_size))
    ends = end_points(sum_e, cnt_e, sum_l, cnt_l, np.stack([emb_e.mean(0), emb_l.mean(0)]),
                      int(t.n_signature_genes), min_cells)
    if not ends.genes.any():
        raise InputError(f"trajectory.lineage={lineage}: no gene is seen in >= trajectory.min_cells={min_cells} "
                         "early and late train cells; use more cells or lower trajectory.min_cells.")

    nulls = matched_null(density, targets, int(t.null_features), rng)
    positions = t.positions if isinstance(t.positions, str) else tuple(int(adapter.vocab[g]) for g in t.positions)
    plan = []  # (unit: the target feature or "set", role, features steered, their signs, alpha)
    for a in (float(x) for x in t.alphas):
        for j in targets:
            plan += [(j, "target" if f == j else "null", (f,), (sign[j],), a) for f in [j, *nulls[j]]]
        plan.append(("set", "target", tuple(targets), tuple(sign[j] for j in targets), a))
        for k in range(int(t.null_features)):
            drawn = {}  # null set k: target j's k-th matched feature, with j's sign (a feature drawn twice counts once)
            for j in targets:
                drawn.setdefault(nulls[j][k], sign[j])
            plan.append(("set", "null", tuple(drawn), tuple(drawn.values()), a))
    ivs = [Intervention(features, "add", tuple(a * s * float(scale[f]) for f, s in zip(features, signs)), positions)
           for _, _, features, signs, a in plan]
    shifts, closer, emb_closer, output = trajectory_shifts(
        adapter, sae, layer, ctx.tokens.subset(early_eval), ivs, ends, output=output, mode=t.mode,
        batch_size=int(t.batch_size), per_forward=int(t.per_forward))
    check_moved(shifts, output, layer)

    rows = []
    for e, (unit, role, features, _, a) in enumerate(plan):
        row = {"target": unit, "feature_id": features[0] if unit != "set" else -1, "role": role, "alpha": a,
               "features": " ".join(map(str, features)), "output": output,
               **toward_scores(shifts, closer, emb_closer, e, a, ends, min_cells),
               "embedding_shift": float(shifts.embedding[e].mean())}
        if unit != "set":
            row.update(sign=sign[unit], density=float(density[features[0]]), scale=float(scale[features[0]]))
            if role == "target":
                row.update(rho_train=float(rho[unit]), rho_eval=float(rho_eval[unit]))
        rows.append(row)
    table = pd.DataFrame(rows).assign(lineage=" -> ".join(lineage), label_key=key)
    single, joint = table[table["target"] != "set"], table[table["target"] == "set"]
    summary = against_null(single.astype({"target": int}), METRICS, ["target", "alpha"])
    set_summary = against_null(joint, METRICS, ["target", "alpha"])
    names = _vocab_names(adapter)
    sig = pd.DataFrame({"gene_id": np.arange(len(names)), "gene": names, "early_mean": ends.mean[0],
                        "late_mean": ends.mean[1], "signature": ends.signature, "n_early": ends.count[0],
                        "n_late": ends.count[1], "in_signature": ends.genes})
    sig = sig[(sig["n_early"] > 0) | (sig["n_late"] > 0)]
    obs = ctx.adata.obs_names.to_numpy()[cells]
    ptable = pd.DataFrame({"cell": obs, "label": labels[cells], "split": split, "pseudotime": pt, "dc1": dc1,
                           "phase": phase, "root": np.arange(len(cells)) == root,
                           "steered": np.isin(cells, early_eval)})

    out_dir = run.run_dir / "causal" / "trajectory"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "trajectory.csv", lambda p: summary.to_csv(p, index=False))
    atomic_write(out_dir / "set.csv", lambda p: set_summary.to_csv(p, index=False))
    atomic_write(out_dir / "null.csv", lambda p: table[table["role"] == "null"].to_csv(p, index=False))
    atomic_write(out_dir / "pseudotime.csv", lambda p: ptable.to_csv(p, index=False))
    atomic_write(out_dir / "signature.csv", lambda p: sig.to_csv(p, index=False))
    by_label = ptable.groupby("label")["pseudotime"].median().reindex(lineage)
    print("median pseudotime per lineage value: " + ", ".join(f"{k} {v:.3f}" for k, v in by_label.items()))
    cols = ["target", "alpha", "rho_train", "rho_eval", *(c for m in METRICS for c in (m, f"{m}_null_mean", f"{m}_q"))]
    print(summary[[c for c in cols if c in summary]].to_string(index=False))
    print(set_summary[[c for c in cols if c in set_summary]].to_string(index=False))
    print(f"wrote {out_dir}/trajectory.csv (features vs matched null), set.csv, null.csv, pseudotime.csv, signature.csv")
    return summary
