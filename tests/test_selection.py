"""Held-out selection: the best feature for a label is chosen on train cells and reported on eval cells.

References: sklearn.metrics.roc_auc_score on the train and eval subsets, computed here independently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from sae4scfm.analysis.labels import held_out_auroc, label_scoring, select_on_train, train_mask
from sae4scfm.errors import InputError


def _overfit_case(seed=0, n=400):
    """Feature 0: perfect for "A" on train cells, random on eval; feature 1: good (not perfect) everywhere;
    features 2-5: noise. Labels A/B/C; the first 300 cells are train."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["A", "B", "C"], n)
    is_train = np.arange(n) < 300
    y = labels == "A"
    X = rng.random((n, 6)) * (rng.random((n, 6)) < 0.5)  # sparse noise, many zeros (ties)
    X[:, 0] = np.where(is_train, y * (1 + rng.random(n)), rng.random(n))
    X[:, 1] = y * 0.6 + rng.random(n)
    return sp.csr_matrix(X), pd.Series(labels), is_train


def test_selection_reports_the_eval_auroc_of_a_train_overfit_feature():
    """A feature perfect on train but random on eval is selected (it is best on train) and reported
    with its low eval AUROC, not the perfect one."""
    X, labels, is_train = _overfit_case()
    D = X.toarray()
    best = select_on_train(X, labels, is_train, min_cells=5).set_index("label")
    assert best.loc["A", "feature_id"] == 0
    assert best.loc["A", "train_auroc"] == 1.0
    ev = ~is_train
    expected = roc_auc_score(labels[ev] == "A", D[ev, 0])
    assert best.loc["A", "eval_auroc"] == pytest.approx(expected, abs=1e-12)
    assert best.loc["A", "eval_auroc"] < 0.7  # random on eval
    assert best.loc["A", "n_train"] == int((labels[is_train] == "A").sum())
    assert best.loc["A", "n_eval"] == int((labels[ev] == "A").sum())


@pytest.mark.parametrize("seed", [1, 2])
def test_held_out_auroc_matches_sklearn_on_each_subset(seed):
    X, labels, is_train = _overfit_case(seed)
    labels = labels.where(np.random.default_rng(seed).random(len(labels)) > 0.1)  # missing labels dropped
    D = X.toarray()
    train, held = held_out_auroc(X, labels, is_train, min_cells=5)
    assert list(train.columns) == ["A", "B", "C"] and list(held.columns) == ["A", "B", "C"]
    for cells, frame in ((is_train, train), (~is_train, held)):
        keep = cells & labels.notna().to_numpy()
        for v in ("A", "B", "C"):
            ref = [roc_auc_score(labels[keep] == v, D[keep, j]) for j in range(D.shape[1])]
            np.testing.assert_allclose(frame[v].to_numpy(), ref, rtol=0, atol=1e-12)


def test_top_n_is_ranked_by_train_auroc_and_prefer_reorders_eligible_features():
    X, labels, is_train = _overfit_case(3)
    train, held = held_out_auroc(X, labels, is_train, min_cells=5)
    top = select_on_train(X, labels, is_train, min_cells=5, top_n=3)
    for v, rows in top.groupby("label"):
        assert list(rows["rank"]) == [0, 1, 2]
        assert list(rows["feature_id"]) == list(train[v].sort_values(ascending=False, kind="stable").index[:3])
        np.testing.assert_allclose(rows["eval_auroc"], held[v].loc[rows["feature_id"]].to_numpy())
    # prefer (e.g. a marker FDR): among features with train AUROC >= 0.7 the lowest wins, even if its AUROC is lower
    prefer = {"A": pd.Series([0.5, 0.01, np.nan, np.nan, np.nan, np.nan])}
    chosen = select_on_train(X, labels, is_train, min_cells=5, min_train_auroc=0.7, prefer=prefer).set_index("label")
    assert train.loc[1, "A"] >= 0.7 and train.loc[0, "A"] > train.loc[1, "A"]
    assert chosen.loc["A", "feature_id"] == 1
    # a preferred feature below the AUROC bar is not eligible
    prefer = {"A": pd.Series([0.5, np.nan, 0.001, np.nan, np.nan, np.nan])}
    chosen = select_on_train(X, labels, is_train, min_cells=5, min_train_auroc=0.7, prefer=prefer).set_index("label")
    assert train.loc[2, "A"] < 0.7 and chosen.loc["A", "feature_id"] == 0
    # nothing eligible: the best train AUROC, whatever prefer says
    chosen = select_on_train(X, labels, is_train, min_cells=5, min_train_auroc=1.01, prefer=prefer).set_index("label")
    assert chosen.loc["A", "feature_id"] == int(train["A"].to_numpy().argmax())


def test_values_need_min_cells_in_train_and_in_eval():
    X, labels, is_train = _overfit_case(4)
    labels = labels.copy()
    rare = np.flatnonzero(~is_train)[:3]
    labels[(labels == "C").to_numpy() & ~is_train] = "B"
    labels[rare] = "C"  # 3 eval cells of C
    best = select_on_train(X, labels, is_train, min_cells=5)
    assert set(best["label"]) == {"A", "B"}


def test_label_scoring_best_is_chosen_on_train_and_reported_on_eval():
    X, labels, is_train = _overfit_case(5)
    obs = pd.DataFrame({"cell_type": labels})
    res = label_scoring(X, obs, ["cell_type"], min_cells=5, is_train=is_train)
    assert "best_auroc:cell_type" not in res and "best_eval_auroc:cell_type" in res
    D = X.toarray()
    ev = ~is_train
    for j in range(D.shape[1]):
        train_auc = {v: roc_auc_score(labels[is_train] == v, D[is_train, j]) for v in ("A", "B", "C")}
        v = max(train_auc, key=train_auc.get)
        assert res.loc[j, "best:cell_type"] == v
        assert res.loc[j, "best_eval_auroc:cell_type"] == pytest.approx(roc_auc_score(labels[ev] == v, D[ev, j]),
                                                                         abs=1e-12)
    # the per-feature columns stay descriptive, on all cells
    np.testing.assert_allclose(res["auroc:cell_type=A"], [roc_auc_score(labels == "A", D[:, j]) for j in range(6)],
                               atol=1e-12)
    assert res.loc[0, "best_eval_auroc:cell_type"] < 0.7 < res.loc[0, "auroc:cell_type=A"]


def test_train_mask_errors():
    with pytest.raises(InputError, match="no 'split' column"):
        train_mask(pd.DataFrame({"x": [1, 2]}))
    with pytest.raises(InputError, match="train and eval"):
        train_mask(pd.DataFrame({"split": ["train", "train"]}))
    np.testing.assert_array_equal(train_mask(pd.DataFrame({"split": pd.Categorical(["eval", "train"])})),
                                  [False, True])
