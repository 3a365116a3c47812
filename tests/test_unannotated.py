"""Unannotated features characterised by co-firing and decoder similarity to annotated ones
(sae4scfm.analysis.coactivation.guilt_by_association / unannotated_summary; analyze.annotated_features)."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from omegaconf import OmegaConf

from sae4scfm.analysis.coactivation import UNANNOTATED_COLUMNS, guilt_by_association, unannotated_summary
from sae4scfm.errors import InputError


def _example(seed=0, N=300, d=8):
    """6 features: 0, 1, 2 annotated; 3 = a noisy copy of 1's firing; 4 = the decoder of 2 sign-flipped,
    firing independently; 5 never fires."""
    rng = np.random.default_rng(seed)
    X = (rng.random((N, 6)) < 0.25) * rng.random((N, 6))
    X[:, 3] = np.where(rng.random(N) < 0.9, X[:, 1], 0.0)
    X[:, 5] = 0.0
    W = rng.normal(size=(6, d))
    W[4] = -2.0 * W[2]
    annotated = np.array([True, True, True, False, False, False])
    terms = np.array(["markers:B cells", "markers:T cells", "msigdb:hallmark:HALLMARK_X", "", "", ""], dtype=object)
    return X, W, annotated, terms


def test_partners_terms_and_statistics_match_brute_force():
    X, W, annotated, terms = _example()
    t = guilt_by_association(sp.csr_matrix(X), W, annotated, terms)
    assert list(t.columns) == UNANNOTATED_COLUMNS and sorted(t["feature_id"]) == [3, 4, 5]
    t = t.set_index("feature_id")
    B = X > 0
    N = len(B)
    for f in (3, 4):  # brute force: Jaccard with every annotated feature, PMI of the best, |cos| of decoders
        jac = [(B[:, f] & B[:, a]).sum() / (B[:, f] | B[:, a]).sum() for a in (0, 1, 2)]
        best = int(np.argmax(jac))
        c = (B[:, f] & B[:, best]).sum()
        assert t.loc[f, "cofiring_partner"] == best
        assert t.loc[f, "cofiring_jaccard"] == pytest.approx(jac[best])
        assert t.loc[f, "cofiring_count"] == c
        assert t.loc[f, "cofiring_pmi"] == pytest.approx(np.log(c * N / (B[:, f].sum() * B[:, best].sum())))
        assert t.loc[f, "cofiring_partner_term"] == terms[best]
        cos = [abs(W[f] @ W[a]) / np.linalg.norm(W[f]) / np.linalg.norm(W[a]) for a in (0, 1, 2)]
        assert t.loc[f, "decoder_partner"] == int(np.argmax(cos))
        assert t.loc[f, "decoder_cosine"] == pytest.approx(max(cos))
    assert t.loc[3, "cofiring_partner"] == 1 and t.loc[3, "cofiring_jaccard"] > 0.8  # the planted copy
    assert t.loc[3, "cofiring_partner_term"] == "markers:T cells"
    assert t.loc[4, "decoder_partner"] == 2 and t.loc[4, "decoder_cosine"] == pytest.approx(1.0)
    assert t.loc[4, "decoder_partner_term"] == "msigdb:hallmark:HALLMARK_X"
    # a feature that never fires has no co-firing partner (but still a nearest decoder)
    assert t.loc[5, "n_fire"] == 0 and t.loc[5, "cofiring_partner"] == -1 and t.loc[5, "cofiring_jaccard"] == 0
    assert np.isnan(t.loc[5, "cofiring_pmi"]) and t.loc[5, "cofiring_partner_term"] == ""
    assert t.loc[5, "decoder_partner"] in (0, 1, 2)


def test_no_annotated_feature_means_no_partner_and_shapes_are_checked():
    X, W, annotated, terms = _example()
    t = guilt_by_association(X, W, np.zeros(6, bool), np.full(6, "", dtype=object))
    assert len(t) == 6 and (t["cofiring_partner"] == -1).all() and (t["decoder_partner"] == -1).all()
    assert len(guilt_by_association(X, W, np.ones(6, bool), terms)) == 0
    with pytest.raises(InputError, match="same SAE"):
        guilt_by_association(X, W[:5], annotated, terms)


def test_summary_counts():
    X, W, annotated, terms = _example()
    t = guilt_by_association(X, W, annotated, terms)
    s = unannotated_summary(t, 6, min_jaccard=0.8, min_cosine=0.99, top=2)
    assert (s["n_features"], s["n_unannotated"], s["n_never_fire"]) == (6, 3, 1)
    assert s["fraction_unannotated"] == pytest.approx(0.5)
    assert s["n_cofiring_partner"] == 1  # feature 3 (Jaccard > 0.8 with feature 1)
    assert s["n_decoder_partner"] == 1  # feature 4 (|cos| = 1 with feature 2)
    jac = t.set_index("feature_id")["cofiring_jaccard"]
    assert s["median_jaccard"] == pytest.approx(np.median(jac[[3, 4]]))
    assert [r["feature_id"] for r in s["top"]] == [3, 4]


def test_annotated_features_from_the_enrichment_results(tmp_path, monkeypatch):
    from sae4scfm.analysis import analyze

    cols = pd.MultiIndex.from_tuples([("enrichment", "best_set:markers"), ("enrichment", "fdr:markers"),
                                      ("enrichment", "best_set:msigdb:hallmark"), ("enrichment", "fdr:msigdb:hallmark"),
                                      ("density", "cell_fraction")])
    results = pd.DataFrame([["B cells", 0.01, "HALLMARK_A", 0.001, 0.1],   # both: the smaller FDR wins
                            ["T cells", 0.2, "HALLMARK_B", 0.04, 0.1],     # hallmark only
                            ["", 1.0, "", 1.0, 0.1],                       # nothing
                            ["NK", 0.05, "HALLMARK_C", 0.06, 0.1]],        # FDR 0.05 is not < 0.05
                           columns=cols)
    (tmp_path / "results.parquet").write_bytes(b"")
    monkeypatch.setattr(analyze, "read_results", lambda out_dir: results)

    class Run:
        out_dir = tmp_path
        run_dir = tmp_path

    annotated, terms = analyze.annotated_features(Run, OmegaConf.create({"max_fdr": 0.05}))
    assert annotated.tolist() == [True, True, False, False]
    assert terms.tolist() == ["msigdb:hallmark:HALLMARK_A", "msigdb:hallmark:HALLMARK_B", "", ""]
    monkeypatch.setattr(analyze, "read_results", lambda out_dir: results[[("density", "cell_fraction")]])
    with pytest.raises(InputError, match="run_enrichment=true"):
        analyze.annotated_features(Run, OmegaConf.create({"max_fdr": 0.05}))
