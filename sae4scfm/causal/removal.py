"""Feature removal by selection: ablate the SAE features a label score selects inside the model and collect
the model's steered cell embedding, beside the same number of random features matched on firing density.

Selection is made on TRAIN cells only (``obs["split"]``): each feature's score is its max one-vs-rest AUROC
(``analysis.labels.label_auroc``) over the values of ``label_key`` (e.g. the batch key), and with the rule
``auroc_over_cell_type`` that minus its max AUROC over the cell types (a batch feature that is not a cell-type
feature: the ``batch_associated`` flag's two conditions, as a ranking). The top n live features (firing on
some train cell) are removed: ``zero`` at every gene token of the SAE's layer (``interventions.stacked_run``
from the cached clean prefix, ``error_preserving`` by default: h − f_S·W_dec[S]). The control for each n and
seed: n random live features, each matched on train firing density (the fraction of train cells where it fires)
to one selected feature (``steering.matched_null``), drawn without replacement and never a selected one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sae4scfm.analysis.labels import label_auroc
from sae4scfm.analysis.primitives import as_matrix
from sae4scfm.causal.interventions import Intervention, clean_prefix, stacked_run
from sae4scfm.causal.steering import matched_null
from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import HookPointName, ScFMAdapter
from sae4scfm.scfm.tokens import TokenizedCells

SELECTIONS = ("auroc", "auroc_over_cell_type")
PREFIX = "model_cell_emb"  # row names: model_cell_emb_removed_n{n}, model_cell_emb_random_n{n}_s{seed}


@dataclass(frozen=True)
class RemovalSet:
    """One removal: the table row ``name``, ``kind`` (``removed``: the top-n by the score; ``random``: the
    density-matched control of seed ``seed``), ``n`` and the SAE feature ids removed."""

    name: str
    kind: str
    n: int
    seed: int | None
    features: tuple[int, ...]


def selection_scores(X, obs: pd.DataFrame, is_train: np.ndarray, label_key: str, *, rule: str = "auroc",
                     cell_type_key: str | None = None, min_cells: int = 5,
                     field: str = "integration.removal.label_key") -> np.ndarray:
    """Score [n_features] of each feature on the train cells (higher = removed first): max one-vs-rest AUROC
    over the ``label_key`` values with >= ``min_cells`` train cells; ``auroc_over_cell_type`` subtracts the
    max AUROC over the ``cell_type_key`` values. X: [n_cells, n_features] pooled activations, rows = obs rows.
    Features with no score (NaN) get -inf. ``field``: the config key named in errors about ``label_key``."""
    if rule not in SELECTIONS:
        raise InputError(f"integration.removal.selection={rule!r} is unknown; use one of {', '.join(SELECTIONS)}.")
    if label_key not in obs:
        raise InputError(f"{field}={label_key!r} is not an obs column of the run's cells; use "
                         f"one of {', '.join(map(str, obs.columns))}.")
    train = np.asarray(is_train, dtype=bool)
    X = as_matrix(X, "features_X", fmt="csr")[train]

    def max_auroc(key: str, field: str) -> np.ndarray:
        labels = obs[key].to_numpy()[train]
        try:
            auc = label_auroc(X, pd.Series(labels, dtype=object), min_cells=min_cells)
        except InputError as err:
            raise InputError(f"{field}={key!r} on the train cells: {err}") from None
        if auc.shape[1] < 2:
            raise InputError(f"{field}={key!r}: the train cells hold {auc.shape[1]} value(s) with >= {min_cells} "
                             "cells; a removal score needs at least two.")
        return auc.to_numpy(dtype=np.float64).max(axis=1)

    score = max_auroc(label_key, field)
    if rule == "auroc_over_cell_type":
        if not cell_type_key or cell_type_key not in obs:
            raise InputError("integration.removal.selection=auroc_over_cell_type needs the run's data.cell_type_key "
                             "in obs; use selection=auroc.")
        score = score - max_auroc(cell_type_key, "data.cell_type_key")
    return np.nan_to_num(score, nan=-np.inf)


def matched_random(density: np.ndarray, selected: np.ndarray, rng: np.random.Generator) -> tuple[int, ...]:
    """One random live feature per selected feature, matched on ``density`` [n_features] by
    ``steering.matched_null``; never a selected feature, never drawn twice."""
    taken = {int(j) for j in selected}
    drawn = []
    for j in selected:
        d = density.copy()
        d[sorted(taken - {int(j)})] = 0  # matched_null draws only live (density > 0) non-target features
        r = matched_null(d, [int(j)], 1, rng)[int(j)][0]
        taken.add(r)
        drawn.append(r)
    return tuple(drawn)


def removal_sets(X, obs: pd.DataFrame, is_train: np.ndarray, label_key: str, n_features_list, seeds, *,
                 rule: str = "auroc", cell_type_key: str | None = None, min_cells: int = 5,
                 field: str = "integration.removal.label_key") -> tuple[list[RemovalSet], np.ndarray]:
    """(the removals: for each n the top-n live features by ``selection_scores`` and, per seed, n matched random
    ones; the score [n_features]). Everything from the train cells of X [n_cells, n_features]."""
    ns = [int(n) for n in n_features_list]
    seeds = [int(s) for s in seeds]
    if not ns or min(ns) < 0:
        raise InputError(f"integration.removal.n_features_list={ns}: give one or more feature counts >= 0.")
    if not seeds:
        raise InputError("integration.removal.seeds=[]: the random-feature control needs at least one seed.")
    train = np.asarray(is_train, dtype=bool)
    Xt = as_matrix(X, "features_X", fmt="csr")[train]
    density = np.asarray((Xt > 0).sum(axis=0), dtype=np.float64).ravel() / max(int(train.sum()), 1)
    live = np.flatnonzero(density > 0)
    if 2 * max(ns) > len(live):
        raise InputError(f"integration.removal.n_features_list={ns}: n={max(ns)} needs {2 * max(ns)} live features "
                         f"(n removed + n random), but {len(live)} of the SAE's {len(density)} features fire on the "
                         f"train cells; use n <= {len(live) // 2}.")
    score = selection_scores(X, obs, train, label_key, rule=rule, cell_type_key=cell_type_key, min_cells=min_cells,
                             field=field)
    order = live[np.argsort(-score[live], kind="stable")]  # ties: lower feature id first
    sets = []
    for n in ns:
        selected = order[:n]
        sets.append(RemovalSet(f"{PREFIX}_removed_n{n}", "removed", n, None, tuple(int(j) for j in selected)))
        for seed in seeds:
            rng = np.random.default_rng([seed, n])
            sets.append(RemovalSet(f"{PREFIX}_random_n{n}_s{seed}", "random", n, seed,
                                   matched_random(density, selected, rng)))
    return sets, score


@torch.no_grad()
def removed_embeddings(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, tokens: TokenizedCells,
                       sets: list[RemovalSet], n_rows: int, *, mode: str = "error_preserving", batch_size: int = 32,
                       per_forward: int = 8) -> dict[str, np.ndarray]:
    """{set name: the model's ``cell_emb`` with the set's features zeroed at every gene token of ``hook_point``,
    float32 [n_rows, d_emb], row = AnnData row (``tokens.cell_index``; NaN for rows not in ``tokens``)}.
    ``per_forward`` removals are stacked along the batch axis of one forward from the clean prefix."""
    ivs = [Intervention(s.features, "zero") for s in sets]
    out: dict[str, np.ndarray] = {}
    with tqdm(total=len(tokens) * len(sets), desc="feature removal", unit="cell·set") as bar:
        for batch in tokens.batches(adapter.cells_per_batch(batch_size)):
            batch = batch.to(adapter.device)
            prefix = clean_prefix(adapter, hook_point, batch)
            rows = batch.cell_index.cpu().numpy()
            for start in range(0, len(sets), per_forward):
                emb = stacked_run(adapter, sae, hook_point, batch, ivs[start:start + per_forward], mode=mode,
                                  prefix=prefix)["cell_emb"].float().cpu().numpy()
                for c, s in enumerate(sets[start:start + per_forward]):
                    if s.name not in out:
                        out[s.name] = np.full((n_rows, emb.shape[-1]), np.nan, dtype=np.float32)
                    out[s.name][rows] = emb[c]
                bar.update(len(rows) * len(emb))
    return out


def against_random(table: pd.DataFrame, sets: list[RemovalSet], metrics: list[tuple[str, str]]) -> pd.DataFrame:
    """Per n and metric: the removed row's score, the random rows' mean and sd, and the empirical one-sided
    p = (1 + #random >= removed) / (1 + #random) that random removals do as well. ``table``: scib rows."""
    rows = []
    for n in sorted({s.n for s in sets}):
        removed = next(s.name for s in sets if s.kind == "removed" and s.n == n)
        random = [s.name for s in sets if s.kind == "random" and s.n == n]
        for metric in metrics:
            r, null = float(table.loc[removed, metric]), table.loc[random, metric].to_numpy(dtype=np.float64)
            rows.append({"n": n, "metric type": metric[0], "metric": metric[1], "removed": r,
                         "random_mean": float(null.mean()), "random_sd": float(null.std(ddof=1)) if len(null) > 1
                         else np.nan, "p_random_ge": (1 + int((null >= r).sum())) / (1 + len(null))})
    return pd.DataFrame(rows)
