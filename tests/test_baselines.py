"""Matched baselines: SAE features vs PCA directions vs raw residual neurons, pooled, scored and
selected the same way (analysis.run_pca_comparison, analysis/baselines.csv).

The pooling is recomputed here from the activation store with pandas, the AUROCs with sklearn on
the train / eval cells, the gene scores with numpy's corrcoef.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import sae4scfm
from sae4scfm.analysis.analyze import activation_pcs, candidate_top_genes, feature_top_genes
from sae4scfm.analysis.labels import train_mask
from sae4scfm.analysis.run_data import load_run_data
from sae4scfm.errors import InputError
from tests.test_interpretation import _address

SEEDS = 2


@pytest.fixture(scope="module")
def baselines(small_run, runs_dir):
    _, run_dir = small_run
    cfg = sae4scfm.compose("analyze", [*_address(runs_dir, run_dir), "analysis.run_label_scoring=false",
                                       "analysis.run_pca_comparison=true", "analysis.gene_sets=[markers]",
                                       f"analysis.baseline_seeds={SEEDS}"])
    sae4scfm.analyze_features(cfg)
    out = run_dir / "analysis"
    return cfg, pd.read_csv(out / "baselines.csv"), pd.read_csv(out / "pca_comparison.csv")


def _store_tokens(cfg):
    """(activations [tokens, d], cell index [tokens]) of the run's layer, train and eval stores."""
    from sae4scfm.scfm.loading import load_model_and_data
    from sae4scfm.store.extract import activation_stores

    run = load_run_data(cfg)
    adapter, adata, tokens = load_model_and_data(run.run_cfg, "cpu")
    layer = int(run.sae_cfg["layer"])
    stores = activation_stores(run.run_cfg, adapter, adata, tokens, [layer])
    acts, cells = [], []
    for split in ("train", "eval"):
        for shard in stores[split][layer].iter_shards():
            acts.append(shard["acts"].double().numpy())
            cells.append(shard["cell"].numpy())
    return np.concatenate(acts), np.concatenate(cells)


def test_baselines_table_matches_candidate_counts_and_methods(baselines):
    cfg, base, _ = baselines
    run = load_run_data(cfg)
    d = int(run.sae_cfg["d_in"])
    n = base.set_index(base["method"] + base["seed"].fillna(-1).astype(int).astype(str))["n_candidates"]
    assert n["sae-1"] == run.n_features == 512
    assert n["pca-1"] == 2 * d and n["neurons-1"] == 2 * d  # every PCA axis and coordinate, both signs
    assert [n[f"sae_subset{s}"] for s in range(SEEDS)] == [2 * d] * SEEDS  # the SAE at the baselines' count
    frac = base["enriched_fraction:markers"]
    assert frac.between(0, 1).all()
    np.testing.assert_allclose(frac * base["n_candidates"], np.round(frac * base["n_candidates"]), atol=1e-9)
    sub = base[base["method"] == "sae_subset"]  # different random subsets give different numbers
    assert sub[["mean_eval_auroc", "enriched_fraction:markers"]].drop_duplicates().shape[0] == SEEDS


@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_baseline_candidates_are_pooled_like_the_sae_features(baselines, pooling):
    """PCk+/- and neuron n+/- of a cell = max (or mean) over its gene tokens of the signed projection."""
    cfg, _, _ = baselines
    cfg = cfg.copy()
    cfg.analysis.pooling = pooling
    run = load_run_data(cfg)
    pcs = activation_pcs(run, cfg.analysis)
    acts, cell = _store_tokens(cfg)
    d = acts.shape[1]
    agg = "max" if pooling == "max" else "mean"
    frame = pd.DataFrame(np.concatenate([acts, -acts], 1)).assign(cell=cell)
    ref = frame.groupby("cell").agg(agg).sort_index()
    np.testing.assert_allclose(pcs["neurons"][ref.index.to_numpy()], ref.to_numpy(), rtol=1e-6, atol=1e-6)
    assert pcs["neuron_names"][:2] == ["n0+", "n1+"] and pcs["neuron_names"][d] == "n0-"
    # PCA: PCk+ = pool((h - mu) . v_k), PCk- = pool(-(h - mu) . v_k); mu (the fitted centre) only
    # shifts every cell by the same c_k, so PCk+ - pool(h . v_k) and -(PCk- + pool'(h . v_k)) are one
    # constant over cells (pool' = min for max pooling)
    n_pcs = pcs["pca"].shape[1] // 2
    assert n_pcs == d  # n_pcs: null = every axis
    axes = pcs["axes"].double().numpy()[:3]
    for k in range(3):
        plus, minus = pcs["pca"][:, k], pcs["pca"][:, n_pcs + k]
        proj = pd.DataFrame({"p": acts @ axes[k], "cell": cell}).groupby("cell")["p"]
        hi, lo = (proj.max(), proj.min()) if pooling == "max" else (proj.mean(), proj.mean())
        idx = hi.index.to_numpy()
        shift_plus, shift_minus = plus[idx] - hi.to_numpy(), -(minus[idx] + lo.to_numpy())
        np.testing.assert_allclose(shift_plus, shift_plus[0], atol=1e-5)
        np.testing.assert_allclose(shift_minus, shift_plus[0], atol=1e-5)


def test_baseline_selection_is_on_train_and_auroc_on_eval(baselines):
    cfg, _, per_label = baselines
    run = load_run_data(cfg)
    pcs = activation_pcs(run, cfg.analysis)
    obs = run.features.obs
    is_train = train_mask(obs)
    labels = obs[run.cell_type_key].astype(str).to_numpy()
    for method, M, names in (("pca", pcs["pca"], pcs["pca_names"]), ("neurons", pcs["neurons"], pcs["neuron_names"]),
                             ("sae", run.features.X.toarray(), [str(i) for i in range(run.n_features)])):
        for row in per_label.head(3).itertuples():
            y = labels == row.label
            train_auc = np.array([roc_auc_score(y[is_train], M[is_train, j]) for j in range(M.shape[1])])
            j = int(np.argmax(train_auc))
            assert str(getattr(row, f"{method}_candidate")) == names[j]
            assert getattr(row, f"{method}_train_auroc") == pytest.approx(train_auc[j], abs=1e-9)
            assert getattr(row, f"{method}_eval_auroc") == pytest.approx(
                roc_auc_score(y[~is_train], M[~is_train, j]), abs=1e-9)
    assert per_label["sae_subset_eval_auroc"].between(0, 1).all()


def test_baselines_share_the_gene_scoring(baselines):
    """Top genes of every method come from the same rule: the SAE's candidate genes equal the gene-scoring
    stage's (max pooling, correlation), and a PCA candidate's first gene is its best-correlated gene."""
    cfg, _, _ = baselines
    run = load_run_data(cfg)
    a = cfg.analysis
    assert candidate_top_genes(run, a, run.features.X) == feature_top_genes(run, a)
    pcs = activation_pcs(run, a)
    expr, genes = run.expression()
    E = expr.toarray()
    top = candidate_top_genes(run, a, pcs["pca"][:, :4])
    for j in range(4):
        x = pcs["pca"][:, j]
        r = np.array([np.corrcoef(x, E[:, g])[0, 1] if E[:, g].std() > 0 else np.nan for g in range(E.shape[1])])
        assert top[j][0] == genes[int(np.nanargmax(r))]
        assert 1 <= len(top[j]) <= int(a.top_genes)


def test_token_pooling_is_refused_for_baselines(baselines):
    cfg, _, _ = baselines
    a = cfg.analysis.copy()
    a.pooling = "token"
    with pytest.raises(InputError, match="analysis.pooling='token'"):
        activation_pcs(load_run_data(cfg), a)
