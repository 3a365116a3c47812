"""Steering: set, add to, scale or ablate SAE features inside the model's forward (one edit per
forward; ``sae4scfm.causal.interventions`` is the mechanism and stacks many in one forward).

Two intervention modes, always named explicitly (``../shared/DESIGN.md``): ``error_preserving``
(default, h + (f' − f)·W_dec) and ``reconstruction`` (decode(f')). Edits act on gene tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from sae4scfm.analysis.primitives import bh_fdr
from sae4scfm.causal.interventions import (
    Intervention,
    clean_prefix,
    latent_edit,
    resid_layer,
    stack_batch,
    stacked_run,
)
from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import HookPointName, ScFMAdapter
from sae4scfm.scfm.tokens import Batch, TokenizedCells


def feature_edit(sae: SAE, edits: Mapping[int, float], *, mode: str = "error_preserving",
                 op: str = "clamp") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The residual-stream replacement ``fn(h [B, T, d], gene_mask [B, T]) -> [B, T, d]`` for
    ``adapter.intervene``: latents f = sae.encode(h) at gene tokens, then for each
    ``feature: value`` of ``edits`` f'_j = value (``clamp``; ``zero`` ablates), f_j + value (``add``)
    or f_j · value (``scale``), at every gene token."""
    features = tuple(int(j) for j in edits)
    return latent_edit(sae, [Intervention(features, op, tuple(float(v) for v in edits.values()))], mode=mode)


@torch.no_grad()
def steer(adapter: ScFMAdapter, sae: SAE, layer: HookPointName, batch: Batch, edits: Mapping[int, float], *,
          mode: str = "error_preserving", op: str = "clamp") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's outputs on ``batch`` (clean, steered): ``edits`` applied at the gene tokens of ``layer``
    (a residual-stream layer, or any hook point name of ``adapter.hook_points`` the SAE was trained on)."""
    fn = feature_edit(sae, edits, mode=mode, op=op)
    clean = adapter.run(batch)
    with adapter.intervene(layer, fn):
        steered = adapter.run(batch)
    return clean, steered


# --------------------------------------------------------------------------- single-feature steering


def readout(out: dict[str, torch.Tensor], key: str, gene_ids: torch.Tensor) -> torch.Tensor:
    """The model's per-token output [B, T] under ``key``: the value itself for [B, T] outputs
    (predicted expression), each token's own gene logit for [B, T, V] gene logits."""
    v = out[key]
    if v.dim() == 3:
        return v.gather(-1, gene_ids.to(v.device)[..., None]).squeeze(-1)
    if v.dim() != 2:
        raise InputError(f"steering.output={key!r} has shape {tuple(v.shape)}; use a per-token output "
                         f"({', '.join(k for k, t in out.items() if t.dim() in (2, 3))}).")
    return v


VOCAB_READOUT = "mvc_vocab"  # GEPC of every vocabulary gene, expressed in the cell or not (ScFMAdapter.vocab_readout)


def paired_readout(adapter: ScFMAdapter, out: dict[str, torch.Tensor], key: str, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The readout ``key`` at every (cell, gene) pair it covers: (values [N], vocabulary gene ids [N]) in an order
    fixed by ``batch``, so a steered minus a clean call is the paired change. Per-token outputs cover each cell's
    gene tokens; ``VOCAB_READOUT`` covers every vocabulary gene in every cell."""
    if key == VOCAB_READOUT:
        values, ids = adapter.vocab_readout(out)
        return values.reshape(-1), ids.repeat(values.shape[0])
    mask = batch.gene_mask.to(out[key].device)
    return readout(out, key, batch.gene_ids)[mask], batch.gene_ids.to(mask.device)[mask]


def shift_output(adapter: ScFMAdapter, out: dict[str, torch.Tensor], last_layer: bool) -> str:
    """The readout ``gene_shifts`` scores when none is set: ``VOCAB_READOUT`` where the model predicts genes outside
    a cell's input and the edit can reach the cell embedding (so a gene the steered cells do not express, e.g. an
    induced gene in control cells or a marker of another type, is tested too), else ``default_output``."""
    return VOCAB_READOUT if adapter.reads_any_gene and not last_layer else default_output(out, last_layer)


def default_output(out: dict[str, torch.Tensor], last_layer: bool = False) -> str:
    """The per-gene readout steering scores when ``steering.output`` is null: scGPT's GEPC expression from
    the cell embedding (``mvc``) when the checkpoint has it, else the masked-value head (``mlm``),
    AIDO.Cell's ``pred``, Geneformer's ``logits``. At the last layer (``last_layer``) the cell embedding is
    the ``<cls>`` state, which edits of gene tokens cannot reach, so the per-token heads come first."""
    order = ("mlm", "pred", "logits", "mvc") if last_layer else ("mvc", "mlm", "pred", "logits")
    for key in order:
        if key in out:
            return key
    raise InputError(f"this model's outputs ({', '.join(out)}) have no per-gene readout; set steering.output.")


@dataclass
class GeneShifts:
    """Per intervention e and vocabulary gene g, over the cells whose readout covers g (whose input holds g, or
    every cell for ``VOCAB_READOUT``):
    n [E, V] cells, total [E, V] Σ Δ, squares [E, V] Σ Δ² of the paired change Δ = steered − clean of
    the per-gene readout; embedding [E, C] ‖Δ cell_emb‖ per steered cell (C cells)."""

    n: np.ndarray
    total: np.ndarray
    squares: np.ndarray
    embedding: np.ndarray

    def paired_test(self, e: int, min_cells: int = 3) -> pd.DataFrame:
        """Paired t-test across cells of intervention e (H0: mean Δ = 0), per gene with >= min_cells:
        rows gene_id, n_cells, mean_delta, t, p, q (BH over the genes tested)."""
        n, s, ss = self.n[e], self.total[e], self.squares[e]
        genes = np.flatnonzero(n >= max(min_cells, 2))
        n, s, ss = n[genes], s[genes], ss[genes]
        mean = s / n
        var = np.maximum(ss - n * mean ** 2, 0) / (n - 1)
        se = np.sqrt(var / n)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(se > 0, mean / se, np.where(mean == 0, 0.0, np.sign(mean) * np.inf))
        p = 2 * stats.t.sf(np.abs(t), n - 1)
        return pd.DataFrame({"gene_id": genes, "n_cells": n.astype(int), "mean_delta": mean, "t": t, "p": p,
                             "q": bh_fdr(p)})


@torch.no_grad()
def gene_shifts(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, tokens: TokenizedCells,
                interventions: list, *, output: str | None = None, mode: str = "error_preserving",
                batch_size: int = 8, per_forward: int = 16, desc: str = "steering",
                edit=None) -> tuple[GeneShifts, str]:
    """Run every intervention on every cell of ``tokens`` (``per_forward`` interventions stacked per
    forward) and accumulate the paired per-gene changes of the readout ``output`` (``shift_output``
    when None). ``edit``: the edit factory of ``stacked_run`` (default: ``Intervention`` objects).
    Returns (GeneShifts, the output key read)."""
    E, V, C = len(interventions), len(adapter.vocab), len(tokens)
    n, total, squares = (np.zeros((E, V)) for _ in range(3))
    embedding = np.zeros((E, C))
    done = 0
    with tqdm(total=C * E, desc=desc, unit="cell·edit") as bar:
        for batch in tokens.batches(adapter.cells_per_batch(batch_size), sort_by_length=False):
            batch = batch.to(adapter.device)
            B = len(batch.cell_index)
            clean = adapter.run(batch)
            prefix = clean_prefix(adapter, hook_point, batch)
            output = output or shift_output(adapter, clean, last_layer=resid_layer(hook_point) == adapter.n_layers)
            base, ids = paired_readout(adapter, clean, output, batch)
            ids = ids.cpu().numpy()
            seen = np.bincount(ids, minlength=V)
            for start in range(0, E, per_forward):
                chunk = interventions[start:start + per_forward]
                out = stacked_run(adapter, sae, hook_point, batch, chunk, mode=mode, prefix=prefix, edit=edit)
                # one readout of all copies (copy c's pairs in the clean order): [copies, pairs]
                flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in out.items()}
                steered = paired_readout(adapter, flat, output, stack_batch(batch, len(chunk)))[0]
                deltas = (steered.reshape(len(chunk), -1) - base).double().cpu().numpy()
                for c, delta in enumerate(deltas):
                    e = start + c
                    n[e] += seen
                    total[e] += np.bincount(ids, delta, minlength=V)
                    squares[e] += np.bincount(ids, delta ** 2, minlength=V)
                    if "cell_emb" in out:
                        shift = (out["cell_emb"][c] - clean["cell_emb"]).norm(dim=-1)
                        embedding[e, done:done + B] = shift.cpu().numpy()
                bar.update(B * len(chunk))
            done += B
    return GeneShifts(n, total, squares, embedding), output


def check_moved(shifts: GeneShifts, output: str, layer: int) -> None:
    """InputError when no intervention changed the readout at all (e.g. a readout the edited positions cannot
    reach), instead of a table of exact zeros."""
    if not np.any(shifts.squares):
        raise InputError(f"the interventions at layer {layer} changed no value of the readout {output!r}: it does not "
                         "depend on the edited gene tokens there (e.g. a <cls>-based readout at the last layer); "
                         "set steering.output / patching.output to a per-token head such as mlm, or use an earlier layer.")


def matched_null(density: np.ndarray, targets: list[int], n_null: int, rng: np.random.Generator) -> dict[int, list[int]]:
    """{target: ``n_null`` random features matched on firing density}: drawn without replacement
    from the 3·n_null live features (density > 0, not a target) nearest in log density."""
    live = np.setdiff1d(np.flatnonzero(density > 0), targets)
    if len(live) < n_null:
        raise InputError(f"steering.null_features={n_null}: only {len(live)} other features fire on these cells; "
                         "lower steering.null_features.")
    log_d = np.log(density[live])
    out = {}
    for j in targets:
        near = live[np.argsort(np.abs(log_d - np.log(max(density[j], 1e-12))), kind="stable")[:3 * n_null]]
        out[j] = sorted(int(x) for x in rng.choice(near, n_null, replace=False))
    return out


@torch.no_grad()
def per_gene_stats(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, tokens: TokenizedCells,
                   batch_size: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sums [V, d_sae]: summed activation of each feature at the tokens of each vocabulary gene, fires [V, d_sae]:
    tokens where it fires, seen [V]: tokens of the gene) over the gene tokens of ``tokens`` at ``hook_point``."""
    V, F = len(adapter.vocab), sae.d_sae
    sums, fires, seen = torch.zeros(V, F, dtype=torch.float64), torch.zeros(V, F), torch.zeros(V)
    for batch in tokens.batches(adapter.cells_per_batch(batch_size)):
        h = adapter.capture(batch, [hook_point])[hook_point]
        mask = batch.gene_mask.to(h.device)
        f = sae.encode(h[mask].float()).cpu()
        ids = batch.gene_ids.to(h.device)[mask].cpu()
        sums.index_add_(0, ids, f.clamp(min=0).double())
        fires.index_add_(0, ids, (f > 0).float())
        seen.index_add_(0, ids, torch.ones(len(ids)))
    return sums.numpy(), fires.numpy(), seen.numpy()


def firing_stats(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, tokens: TokenizedCells,
                 batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(density [d_sae]: fraction of gene tokens where each feature fires, scale [d_sae]: its mean
    activation where it fires, 0 for silent features) on the cells of ``tokens``."""
    sums, fires, seen = per_gene_stats(adapter, sae, hook_point, tokens, batch_size)
    fired, summed = fires.sum(0).astype(np.float64), sums.sum(0)
    return fired / max(seen.sum(), 1), np.divide(summed, fired, out=np.zeros_like(summed), where=fired > 0)


# --------------------------------------------------------------------------- the steering stage


def _vocab_names(adapter: ScFMAdapter) -> np.ndarray:
    """Gene symbol of every vocabulary id [V] (the model's symbol where its vocabulary holds IDs)."""
    names = np.empty(len(adapter.vocab), dtype=object)
    symbols = adapter.gene_symbols()
    for gene, i in adapter.vocab.items():
        names[i] = symbols.get(gene, gene)
    return names


MARKER_SOURCES = ("de", "builtin")


def de_markers(expression, genes: list[str], labels: np.ndarray, is_train: np.ndarray, n: int) -> dict[str, list[str]]:
    """{label: its ``n`` top marker genes}: scanpy's ``rank_genes_groups`` (t-test, each label vs the rest) on the
    TRAIN cells' log1p(CP10k) ``expression`` [cells, genes], keeping genes with a positive log fold change."""
    import anndata as ad
    import scanpy as sc

    train = np.flatnonzero(is_train)
    adata = ad.AnnData(expression[train], obs=pd.DataFrame({"label": pd.Categorical(np.asarray(labels)[train])},
                                                             index=[str(i) for i in train]))
    adata.var_names = pd.Index([str(g) for g in genes])
    adata.uns["log1p"] = {"base": None}
    groups = [g for g, c in adata.obs["label"].value_counts().items() if c >= 2]
    sc.tl.rank_genes_groups(adata, "label", groups=groups, method="t-test", n_genes=adata.n_vars)
    out = {}
    for g in groups:
        table = sc.get.rank_genes_groups_df(adata, group=g)
        out[str(g)] = table[table["logfoldchanges"] > 0]["names"].astype(str).head(n).tolist()
    return out


def steer_features(cfg) -> pd.DataFrame:
    """``scripts/steer_features.py``: single-feature steering of a run with its matched null.

    For each target feature (``steering.features``, or the best feature per value of
    ``steering.label_key`` chosen on train cells) and each α of ``steering.alphas`` (in units of the
    feature's mean activation where it fires), the feature is edited (``steering.op``, default add:
    + α·scale·W_dec[j] at ``steering.positions``) in ``steering.n_cells`` eval cells. Per gene: the
    paired change of the model's readout across cells, t-test, BH q; top up/down genes; the cell
    embedding's shift. Null: ``steering.null_features`` features matched on firing density, same α.
    Writes ``<run>/causal/steering/{steering.csv, genes.csv}`` and returns the summary table.
    """
    from sae4scfm.analysis.enrichment import load_gene_sets
    from sae4scfm.analysis.run_data import marker_set_for
    from sae4scfm.atomic import atomic_write
    from sae4scfm.causal.run import open_causal_run

    s = cfg.steering
    ctx = open_causal_run(cfg, "steering")
    run, sae, layer, adapter = ctx.run, ctx.sae, ctx.layer, ctx.adapter
    rng = np.random.default_rng(int(s.seed))
    target_label = ctx.targets(s, "steering")
    targets = list(target_label)
    steer_tokens = ctx.eval_tokens(int(s.n_cells), rng)
    density, scale = firing_stats(adapter, sae, layer, steer_tokens, int(s.batch_size))
    silent = [j for j in targets if density[j] == 0]
    if silent:
        log_silent = ", ".join(map(str, silent))
        raise InputError(f"steering: features {log_silent} never fire on the {len(steer_tokens)} steered eval cells, so "
                         "their activation scale is undefined; choose other features or more cells.")
    nulls = matched_null(density, targets, int(s.null_features), rng)
    alphas = [float(a) for a in s.alphas]
    plan = [(j, f, a) for j in targets for f in [j, *nulls[j]] for a in alphas]  # (target, feature steered, α)
    positions = s.positions if isinstance(s.positions, str) else tuple(int(adapter.vocab[g]) for g in s.positions)
    ivs = [Intervention((f,), s.op, a * float(scale[f]) if s.op == "add" else a, positions) for _, f, a in plan]
    shifts, output = gene_shifts(adapter, sae, layer, steer_tokens, ivs, output=s.output, mode=s.mode,
                                 batch_size=int(s.batch_size), per_forward=int(s.per_forward))
    check_moved(shifts, output, layer)
    names = _vocab_names(adapter)
    if s.markers not in MARKER_SOURCES:
        raise InputError(f"steering.markers={s.markers!r} is unknown; use one of {', '.join(MARKER_SOURCES)}.")
    if s.markers == "de" and any(label is not None for label in target_label.values()):
        from sae4scfm.analysis.labels import train_mask

        key, labels = ctx.labels(s.get("label_key"), "steering.label_key")
        expression, universe = run.expression()
        marker_lists = de_markers(expression, universe, labels.to_numpy(), train_mask(run.features.obs),
                                  int(s.n_markers))
    else:
        builtin = load_gene_sets("markers")
        marker_lists = {}
        for label in set(target_label.values()) - {None}:
            name = marker_set_for(run, label)
            if name:
                marker_lists[label] = list(builtin.get(name, ()))
    tests = [shifts.paired_test(e, int(s.min_cells)) for e in range(len(plan))]
    excess = null_excess(tests, plan)
    rows, gene_rows = [], []
    for e, (j, f, a) in enumerate(plan):
        test = tests[e]
        test["gene"] = names[test["gene_id"]]
        label = target_label.get(j)
        marker_set = (f"de:{label}" if s.markers == "de" else marker_set_for(run, label)) if label is not None else None
        marker_genes = set(marker_lists.get(label, ())) if label is not None else set()
        is_marker = test["gene"].isin(marker_genes).to_numpy()
        on_markers = test.loc[is_marker, "mean_delta"]
        pct = test["mean_delta"].rank(pct=True).to_numpy()  # 1 = moved most upwards of all genes tested
        marker_rank = float((pct if a >= 0 else 1 - pct)[is_marker].mean()) if is_marker.any() else np.nan
        pct = pd.Series(excess[e]).rank(pct=True).to_numpy()
        ranked = (pct if a >= 0 else 1 - pct)[is_marker]
        marker_excess_rank = float(np.nanmean(ranked)) if np.isfinite(ranked).any() else np.nan
        sig = test[test["q"] < float(s.fdr)]
        row = {"target": j, "feature_id": f, "role": "target" if f == j else "null", "alpha": a,
               "label": label, "marker_set": marker_set, "output": output,
               "n_genes_tested": len(test), "n_up": int((sig["mean_delta"] > 0).sum()),
               "n_down": int((sig["mean_delta"] < 0).sum()),
               "n_markers": int(is_marker.sum()),
               "marker_shift": float(on_markers.mean()) if len(on_markers) else np.nan,
               "marker_rank": marker_rank, "marker_excess_rank": marker_excess_rank,
               "mean_abs_shift": float(test["mean_delta"].abs().mean()) if len(test) else np.nan,
               "embedding_shift": float(shifts.embedding[e].mean())}
        if f == j:
            up = sig[sig["mean_delta"] > 0].nlargest(int(s.top_genes), "mean_delta")
            down = sig[sig["mean_delta"] < 0].nsmallest(int(s.top_genes), "mean_delta")
            row["top_up"], row["top_down"] = " ".join(up["gene"]), " ".join(down["gene"])
            gene_rows.append(test.assign(target=j, alpha=a))
        rows.append(row)
    table = pd.DataFrame(rows)
    # marker_rank: the mean percentile of the label's marker genes among all genes tested, ranked by their change
    # in α's direction (0.5 = no more than any gene, so a shift of every gene does not count); marker_excess_rank:
    # the same ranking of each gene's change as a z-score against the other null features' changes of that gene
    # (null_excess), so genes that any edit moves (highly expressed, variable) do not count either
    table = table.assign(n_significant=table["n_up"] + table["n_down"])
    summary = against_null(table, ["marker_excess_rank", "marker_rank", "n_significant", "embedding_shift"],
                           ["target", "alpha"])
    out_dir = run.run_dir / "causal" / "steering"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "steering.csv", lambda p: summary.to_csv(p, index=False))
    atomic_write(out_dir / "null.csv", lambda p: table[table["role"] == "null"].to_csv(p, index=False))
    genes = pd.concat(gene_rows, ignore_index=True) if gene_rows else pd.DataFrame()
    atomic_write(out_dir / "genes.csv", lambda p: genes.to_csv(p, index=False))
    print(summary.drop(columns=["top_up", "top_down"], errors="ignore").to_string(index=False))
    print(f"wrote {out_dir}/steering.csv (targets vs matched null), genes.csv, null.csv")
    return summary


def null_excess(tests: list[pd.DataFrame], plan: list[tuple[int, int, float]]) -> list[np.ndarray]:
    """Per intervention e of ``plan`` ((target, feature steered, α); its ``paired_test`` in ``tests[e]``): each
    tested gene's mean change as a z-score against the null features of the same (target, α), leaving the row's
    own feature out, (Δ_g − mean_null Δ_g) / sd_null Δ_g: [genes of tests[e]] in its row order. Leave-one-out
    keeps the target and every null row exchangeable under the null, so the empirical p stays valid."""
    nulls: dict[tuple[int, float], list[int]] = {}
    for e, (j, f, a) in enumerate(plan):
        if f != j:
            nulls.setdefault((j, a), []).append(e)
    out = []
    for e, (j, _, a) in enumerate(plan):
        mine = tests[e].set_index("gene_id")["mean_delta"]
        others = [o for o in nulls.get((j, a), []) if o != e]
        if len(others) < 2:
            out.append(np.full(len(mine), np.nan))
            continue
        D = np.stack([tests[o].set_index("gene_id")["mean_delta"].reindex(mine.index).to_numpy() for o in others])
        sd = D.std(0, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append((mine.to_numpy() - D.mean(0)) / np.where(sd > 0, sd, np.nan))
    return out


def against_null(table: pd.DataFrame, metrics: list[str], keys: list[str]) -> pd.DataFrame:
    """The ``role == "target"`` rows of ``table`` with, per metric, the mean of the ``role == "null"`` rows
    sharing the target's ``keys`` (e.g. target, alpha), the empirical one-sided p-value
    (1 + #null >= target)/(1 + n_null) and its BH q over all target rows."""
    targets = table[table["role"] == "target"].reset_index(drop=True)
    null = table[table["role"] == "null"]
    groups = {key if isinstance(key, tuple) else (key,): g for key, g in null.groupby(keys)}
    for metric in metrics:
        means, ps = [], []
        for _, row in targets.iterrows():
            g = groups.get(tuple(row[k] for k in keys))
            v = g[metric].to_numpy(float) if g is not None else np.zeros(0)
            v, x = v[np.isfinite(v)], float(row[metric])
            means.append(float(v.mean()) if len(v) else np.nan)
            ps.append(float((1 + np.sum(v >= x)) / (1 + len(v))) if len(v) and np.isfinite(x) else np.nan)
        ps = np.asarray(ps, dtype=float)
        q = np.full(len(ps), np.nan)
        q[np.isfinite(ps)] = bh_fdr(ps[np.isfinite(ps)])
        targets[f"{metric}_null_mean"], targets[f"{metric}_p"], targets[f"{metric}_q"] = means, ps, q
    return targets.drop(columns=["role", "feature_id"])
