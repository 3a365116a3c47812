import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from sae4scfm.analysis.labels import auroc_sparse, label_auroc, label_scoring
from sae4scfm.analysis.results import read_results, update_results
from sae4scfm.errors import InputError


def _tricky_matrix(rng, n=300, m=40, density=0.2):
    """Sparse matrix with ties, explicit zeros, negatives, all-zero and constant columns."""
    X = sp.random(n, m, density=density, format="coo", random_state=rng)
    X.data = rng.integers(-3, 5, size=X.nnz).astype(float)  # heavy ties, negatives, explicit zeros
    X = X.tolil()
    X[:, 0] = 0.0  # all-zero column
    X[:, 1] = 0.0
    X[rng.choice(n, 50, replace=False), 1] = 2.5  # all-equal nonzeros
    X[:, 2] = 0.0
    X[:, 2] = 7.0  # fully dense constant column
    X[:, 3] = 0.0
    X[:, 3] = -np.arange(n, dtype=float) - 1  # dense negatives, no zeros
    X[:, 4] = 0.0
    X[rng.choice(n, 30, replace=False), 4] = rng.normal(size=30)[:, None]  # continuous, no ties
    X = X.tocsc()
    # explicit stored zeros in a few columns
    coo = X.tocoo()
    rows = np.concatenate([coo.row, rng.integers(0, n, 20)])
    cols = np.concatenate([coo.col, rng.integers(5, m, 20)])
    data = np.concatenate([coo.data, np.zeros(20)])
    # keep one entry per position (duplicate positions would be summed)
    key = rows * m + cols
    _, first = np.unique(key, return_index=True)
    Xz = sp.csc_matrix((data[first], (rows[first], cols[first])), shape=(n, m))
    assert (Xz.data == 0).sum() > 0
    return Xz


def _sklearn_per_column(X, y):
    D = X.toarray()
    return np.array([roc_auc_score(y, D[:, j]) for j in range(D.shape[1])])


@pytest.mark.parametrize("fmt", ["csc", "csr", "coo"])
def test_auroc_sparse_matches_sklearn(fmt):
    rng = np.random.default_rng(0)
    X = _tricky_matrix(rng)
    y = rng.random(X.shape[0]) < 0.3
    got = auroc_sparse(X.asformat(fmt), y)
    assert got.dtype == np.float64 and got.shape == (X.shape[1],)
    np.testing.assert_allclose(got, _sklearn_per_column(X, y), rtol=0, atol=1e-12)
    # dense input and 0/1 labels give the same
    np.testing.assert_allclose(auroc_sparse(X.toarray(), y.astype(int)), got, rtol=0, atol=1e-12)


def test_auroc_sparse_known_values_and_mannwhitney():
    rng = np.random.default_rng(1)
    X = _tricky_matrix(rng, n=120, m=15)
    y = rng.random(120) < 0.5
    got = auroc_sparse(X, y)
    assert got[0] == 0.5 and got[2] == 0.5  # constant columns
    D = X.toarray()
    u = np.array([mannwhitneyu(D[y, j], D[~y, j]).statistic for j in range(D.shape[1])])
    np.testing.assert_allclose(got, u / (y.sum() * (~y).sum()), rtol=0, atol=1e-12)
    # perfect separation
    Xp = sp.csc_matrix(y.astype(float)[:, None] * 3.0)
    assert auroc_sparse(Xp, y)[0] == 1.0
    assert auroc_sparse(-Xp, y)[0] == 0.0


def test_auroc_sparse_duplicate_entries_summed():
    # non-canonical COO with duplicates: scipy semantics sum them
    X = sp.coo_matrix(([1.0, 2.0, -1.0, 1.0], ([0, 0, 1, 1], [0, 0, 0, 0])), shape=(4, 1))
    y = np.array([True, False, True, False])
    assert auroc_sparse(X, y)[0] == roc_auc_score(y, X.toarray()[:, 0])


def test_auroc_sparse_one_class_errors():
    X = sp.random(10, 3, density=0.5, format="csr", random_state=0)
    with pytest.raises(InputError, match="one"):
        auroc_sparse(X, np.ones(10, dtype=bool))
    with pytest.raises(InputError):
        auroc_sparse(X, np.ones(9, dtype=bool))


def test_label_auroc_matches_sklearn_one_vs_rest_with_nan():
    rng = np.random.default_rng(2)
    X = _tricky_matrix(rng, n=400, m=25)
    labels = pd.Series(rng.choice(["T", "B", "NK", "rare"], size=400, p=[0.4, 0.3, 0.29, 0.01]), dtype=object)
    labels[rng.random(400) < 0.15] = np.nan
    n_rare = int((labels == "rare").sum())
    assert 0 < n_rare < 10
    got = label_auroc(X, labels, min_cells=10)
    assert list(got.columns) == ["B", "NK", "T"]  # rare skipped, sorted
    assert got.index.name == "feature_id" and list(got.index) == list(range(25))
    valid = labels.notna().to_numpy()
    D = X.toarray()[valid]
    lv = labels[valid].to_numpy()
    for value in got.columns:
        ref = [roc_auc_score(lv == value, D[:, j]) for j in range(D.shape[1])]
        np.testing.assert_allclose(got[value].to_numpy(), ref, rtol=0, atol=1e-12)
    # min_cells=1 keeps "rare"; NaN is never a column; same values for the others
    all_ = label_auroc(X, labels.to_numpy())
    assert list(all_.columns) == ["B", "NK", "T", "rare"]
    np.testing.assert_allclose(all_[["B", "NK", "T"]].to_numpy(), got.to_numpy(), rtol=0, atol=1e-12)


def test_label_auroc_categorical_order_and_one_class():
    rng = np.random.default_rng(3)
    X = sp.random(50, 4, density=0.3, format="csr", random_state=rng)
    lab = pd.Series(pd.Categorical(rng.choice(["b", "a"], 50), categories=["z", "b", "a"]))
    assert list(label_auroc(X, lab).columns) == ["b", "a"]  # observed, in category order
    with pytest.raises(InputError):
        label_auroc(X, pd.Series(["a"] * 49 + [None]))


def test_large_case_is_vectorised():
    rng = np.random.default_rng(4)
    n, m = 20_000, 2_000
    X = sp.random(n, m, density=0.01, format="csr", random_state=rng, dtype=np.float64)
    X.data = np.round(X.data * 10)  # ties and explicit zeros
    labels = rng.integers(0, 20, n)
    t0 = time.perf_counter()
    auc = label_auroc(X, labels)
    a1 = auroc_sparse(X, labels == 3)
    elapsed = time.perf_counter() - t0
    print(f"20000x2000 @1%: label_auroc(20 values) + auroc_sparse in {elapsed:.2f}s")
    assert auc.shape == (m, 20)
    np.testing.assert_allclose(auc[3].to_numpy(), a1, rtol=0, atol=1e-12)
    D = X[:, :5].toarray()
    ref = [roc_auc_score(labels == 3, D[:, j]) for j in range(5)]
    np.testing.assert_allclose(a1[:5], ref, rtol=0, atol=1e-12)


def test_label_scoring_columns_and_best():
    rng = np.random.default_rng(5)
    X = _tricky_matrix(rng, n=200, m=12)
    obs = pd.DataFrame(
        {"cell_type": rng.choice(["T", "B", "NK"], 200), "batch": rng.choice([1.0, 2.0, np.nan], 200)},
        index=[f"cell{i}" for i in range(200)],
    )
    res = label_scoring(X, obs, ["cell_type", "batch"], min_cells=5)
    assert list(res.index) == list(range(12)) and res.index.name == "feature_id"
    assert list(res.columns) == [
        "auroc:cell_type=B", "auroc:cell_type=NK", "auroc:cell_type=T", "best:cell_type", "best_auroc:cell_type",
        "auroc:batch=1.0", "auroc:batch=2.0", "best:batch", "best_auroc:batch",
    ]
    D = X.toarray()
    ref_nk = [roc_auc_score(obs["cell_type"] == "NK", D[:, j]) for j in range(12)]
    np.testing.assert_allclose(res["auroc:cell_type=NK"], ref_nk, rtol=0, atol=1e-12)
    aucs = res[["auroc:cell_type=B", "auroc:cell_type=NK", "auroc:cell_type=T"]].to_numpy()
    expected_best = np.array(["B", "NK", "T"])[aucs.argmax(axis=1)]
    assert list(res["best:cell_type"]) == list(expected_best)
    np.testing.assert_array_equal(res["best_auroc:cell_type"].to_numpy(), aucs.max(axis=1))


def test_label_scoring_errors():
    X = sp.random(20, 3, density=0.5, format="csr", random_state=0)
    obs = pd.DataFrame({"cell_type": ["a", "b"] * 10, "empty": [np.nan] * 20})
    with pytest.raises(InputError, match="celltype") as exc:
        label_scoring(X, obs, ["celltype"])
    assert "cell_type" in str(exc.value)  # lists available columns
    with pytest.raises(InputError, match="empty"):
        label_scoring(X, obs, ["empty"])
    with pytest.raises(InputError, match="min_cells"):
        label_scoring(X, obs, ["cell_type"], min_cells=11)
    with pytest.raises(InputError, match="rows"):
        label_scoring(X, obs.iloc[:10], ["cell_type"])


def _metrics(n, seed, ids=None):
    rng = np.random.default_rng(seed)
    idx = pd.Index(ids if ids is not None else range(n), name="feature_id")
    return pd.DataFrame(
        {"score": rng.random(n), "count": rng.integers(0, 100, n), "best": rng.choice(["x", "y z", "a,b"], n)},
        index=idx,
    )


def test_update_results_replaces_only_named_analysis(tmp_path):
    a = _metrics(5, 0)
    b = _metrics(5, 1)[["score"]]
    update_results(tmp_path, "label_auroc", a)
    merged = update_results(tmp_path, "density", b)
    assert merged.columns.names == ["analysis", "metric"]
    assert list(merged.columns) == [("label_auroc", "score"), ("label_auroc", "count"), ("label_auroc", "best"),
                                    ("density", "score")]
    a2 = _metrics(5, 2)[["score", "best"]].rename(columns={"score": "new_score"})
    merged = update_results(tmp_path, "label_auroc", a2)
    assert set(merged.columns) == {("density", "score"), ("label_auroc", "new_score"), ("label_auroc", "best")}
    pd.testing.assert_series_equal(merged[("density", "score")], b["score"], check_names=False)
    pd.testing.assert_series_equal(merged[("label_auroc", "best")], a2["best"], check_names=False)
    pd.testing.assert_frame_equal(read_results(tmp_path), merged)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_update_results_outer_join_on_feature_id(tmp_path):
    update_results(tmp_path, "a", _metrics(3, 0, ids=[0, 1, 2])[["score"]])
    merged = update_results(tmp_path, "b", _metrics(3, 1, ids=[2, 3, 4])[["score"]])
    assert list(merged.index) == [0, 1, 2, 3, 4]
    assert merged[("a", "score")].isna().tolist() == [False, False, False, True, True]
    assert merged[("b", "score")].isna().tolist() == [True, True, False, False, False]


def test_results_round_trip_parquet_and_csv(tmp_path):
    table = _metrics(7, 3)
    merged = update_results(tmp_path, "label_auroc", table)
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.parquet").exists()
    assert merged.dtypes[("label_auroc", "count")] == np.int64
    back = read_results(tmp_path)  # parquet
    pd.testing.assert_frame_equal(back, merged, check_exact=True)
    (tmp_path / "results.parquet").unlink()
    back_csv = read_results(tmp_path)  # CSV only
    pd.testing.assert_frame_equal(back_csv, merged, check_exact=True)
    raw = pd.read_csv(tmp_path / "results.csv", header=[0, 1], index_col=0)
    assert list(raw.columns) == list(merged.columns)


def test_update_results_rejects_bad_tables(tmp_path):
    with pytest.raises(InputError, match="strings"):
        update_results(tmp_path, "x", pd.DataFrame({0: [1.0]}))
    with pytest.raises(InputError, match="integer"):
        update_results(tmp_path, "x", pd.DataFrame({"a": [1.0]}, index=["f0"]))
    with pytest.raises(InputError, match="no results"):
        read_results(tmp_path / "missing")


def _label_table(seed=0):
    rng = np.random.default_rng(seed)
    X = _tricky_matrix(rng, n=150, m=9)
    obs = pd.DataFrame({"cell_type": rng.choice(["CD4+/CD25 T Reg", "B=1", "NK:x"], 150),
                        "batch": rng.choice(["a", "b"], 150)})
    return label_scoring(X, obs, ["cell_type", "batch"], min_cells=1, metrics=["auroc", "f1", "ami"],
                         batch_key="batch", cell_type_key="cell_type")


def test_tidy_table_holds_the_wide_numbers_without_parsing_names(tmp_path):
    """A reader of results_long only (no metric-name parsing) gets every number of the wide table;
    labels with '/', '=' and ':' are in their own columns."""
    from sae4scfm.analysis.results import read_tidy_results

    scores = _label_table()
    wide = update_results(tmp_path, "label_scoring", scores)
    long = read_tidy_results(tmp_path)
    assert list(long.columns) == ["feature_id", "analysis", "label_key", "label", "metric", "value", "text"]
    assert len(long) == scores.shape[0] * scores.shape[1]
    auroc = long[(long["metric"] == "auroc") & (long["label_key"] == "cell_type")]
    assert set(auroc["label"]) == {"CD4+/CD25 T Reg", "B=1", "NK:x"}
    for label in ("CD4+/CD25 T Reg", "B=1", "NK:x"):
        got = auroc[auroc["label"] == label].set_index("feature_id")["value"].sort_index()
        np.testing.assert_array_equal(got.to_numpy(), wide[("label_scoring", f"auroc:cell_type={label}")].to_numpy())
    best = long[(long["metric"] == "best") & (long["label_key"] == "cell_type")].set_index("feature_id")["text"]
    assert best.sort_index().tolist() == wide[("label_scoring", "best:cell_type")].tolist()
    flag = long[long["metric"] == "batch_associated"]
    assert flag["label_key"].isna().all() and flag["label"].isna().all()
    np.testing.assert_array_equal(flag.sort_values("feature_id")["value"].to_numpy(),
                                  wide[("label_scoring", "batch_associated")].to_numpy(float))
    # every wide number is in the long table: pivot the long table back to wide names
    for (_, metric_name), col in wide.items():
        key, label, metric = scores.attrs["tidy"].get(metric_name, (None, None, metric_name))
        sel = long[(long["metric"] == metric) & (long["label_key"].fillna("") == (key or ""))
                   & (long["label"].fillna("") == (label or ""))].sort_values("feature_id")
        if pd.api.types.is_numeric_dtype(col.dtype):
            np.testing.assert_array_equal(sel["value"].to_numpy(), col.to_numpy(float), err_msg=metric_name)
        else:
            assert sel["text"].tolist() == col.tolist(), metric_name


def test_tidy_round_trip_csv_and_rerun_replaces_only_its_rows(tmp_path):
    from sae4scfm.analysis.results import read_tidy_results

    update_results(tmp_path, "label_scoring", _label_table(0))
    update_results(tmp_path, "density", _metrics(9, 1)[["score"]])
    before = read_tidy_results(tmp_path)
    again = _label_table(1)  # other numbers
    update_results(tmp_path, "label_scoring", again)
    after = read_tidy_results(tmp_path)
    pd.testing.assert_frame_equal(after[after["analysis"] == "density"].reset_index(drop=True),
                                  before[before["analysis"] == "density"].reset_index(drop=True))
    new = after[(after["analysis"] == "label_scoring") & (after["metric"] == "auroc")]
    assert len(new) == len(before[(before["analysis"] == "label_scoring") & (before["metric"] == "auroc")])
    col = new[new["label"] == "B=1"].sort_values("feature_id")["value"].to_numpy()
    np.testing.assert_array_equal(col, again["auroc:cell_type=B=1"].to_numpy())
    (tmp_path / "results_long.parquet").unlink()
    pd.testing.assert_frame_equal(read_tidy_results(tmp_path), after, check_exact=True)  # CSV only


def test_feature_annotations_in_var_and_uns(tmp_path):
    import anndata as ad

    from sae4scfm.analysis.results import write_feature_annotations

    path = tmp_path / "features.h5ad"
    original = ad.AnnData(sp.random(150, 9, density=0.3, format="csr", random_state=0, dtype=np.float32),
                          obs=pd.DataFrame({"cell_type": pd.Categorical(["B", "T"] * 75)},
                                           index=[f"c{i}" for i in range(150)]),
                          layers={"mean": sp.random(150, 9, density=0.2, format="csr", random_state=1,
                                                    dtype=np.float32)},
                          uns={"sae4scfm": {"pooling": "max", "layer": 2}})
    original.write_h5ad(path)
    scores = _label_table()
    write_feature_annotations(path, "label_scoring", scores, {"min_cells": 1, "label_keys": None})
    write_feature_annotations(path, "density", _metrics(9, 1)[["score"]], {"x": [1, 2]})
    f = ad.read_h5ad(path)
    np.testing.assert_array_equal(f.var["label_scoring:auroc:cell_type=CD4+_CD25 T Reg"].to_numpy(),
                                  scores["auroc:cell_type=CD4+/CD25 T Reg"].to_numpy())
    assert f.var["label_scoring:best:cell_type"].tolist() == scores["best:cell_type"].tolist()
    assert f.uns["label_scoring"]["params"]["min_cells"] == 1 and f.uns["density"]["analysis"] == "density"
    # everything else of the file is carried over unchanged (the matrices are copied, never read)
    assert (f.X != original.X).nnz == 0 and (f.layers["mean"] != original.layers["mean"]).nnz == 0
    pd.testing.assert_frame_equal(f.obs, original.obs)
    assert f.uns["sae4scfm"] == {"pooling": "max", "layer": 2}
    size = path.stat().st_size  # rewriting the same annotation does not grow the file
    write_feature_annotations(path, "density", _metrics(9, 1)[["score"]], {"x": [1, 2]})
    assert path.stat().st_size == size
    # a re-run replaces the prefix's columns only
    write_feature_annotations(path, "label_scoring", scores[["best:cell_type"]], {})
    f = ad.read_h5ad(path)
    assert [c for c in f.var.columns if c.startswith("label_scoring:")] == ["label_scoring:best:cell_type"]
    assert "density:score" in f.var and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- F1, AMI, batch flag

from sklearn.metrics import adjusted_mutual_info_score, f1_score  # noqa: E402

import sae4scfm.analysis.labels as analysis_mod  # noqa: E402
from sae4scfm.analysis.labels import label_ami, label_f1


def _brute_best_f1(y, x):
    """max over all thresholds t (every distinct value, and below the minimum) of F1(y, x > t)."""
    ts = np.concatenate([[x.min() - 1.0], np.unique(x)])
    return max(f1_score(y, x > t, zero_division=0.0) for t in ts)


def _labels_with_nan(rng, n):
    lab = pd.Series(rng.choice(["T", "B", "NK", "rare"], size=n, p=[0.4, 0.3, 0.27, 0.03]), dtype=object)
    lab[rng.random(n) < 0.1] = np.nan
    return lab


@pytest.mark.parametrize("block", [None, (7, 7)])
@pytest.mark.parametrize("continuous", [False, True])
def test_label_f1_matches_bruteforce_sklearn(monkeypatch, block, continuous):
    if block is not None:  # many tiny column blocks
        monkeypatch.setattr(analysis_mod, "_BLOCK_NNZ", block)
    rng = np.random.default_rng(10)
    X = _tricky_matrix(rng, n=90, m=14)
    if continuous:  # float64 values that float32 cannot hold: the two-pass sort
        X = X.tocsc(copy=True)
        X.data[X.data != 0] += rng.normal(scale=1e-9, size=int((X.data != 0).sum()))
    labels = _labels_with_nan(rng, 90)
    got = label_f1(X, labels, min_cells=3)
    valid = labels.notna().to_numpy()
    D, lv = X.toarray()[valid], labels[valid].to_numpy()
    assert list(got.columns) == sorted(set(lv[pd.Series(lv).map(pd.Series(lv).value_counts()) >= 3]))
    for value in got.columns:
        ref = [_brute_best_f1(lv == value, D[:, j]) for j in range(D.shape[1])]
        np.testing.assert_allclose(got[value].to_numpy(), ref, rtol=0, atol=1e-12)
    # AUROC is unchanged by the blocking and the sort path
    auc = label_auroc(X, labels, min_cells=3)
    for value in auc.columns:
        ref = [roc_auc_score(lv == value, D[:, j]) for j in range(D.shape[1])]
        np.testing.assert_allclose(auc[value].to_numpy(), ref, rtol=0, atol=1e-12)


def test_label_f1_known_values():
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    x = np.array([5.0, 3.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    got = label_f1(sp.csr_matrix(x[:, None]), pd.Series(np.where(y, "a", "b")))
    # a: best is x > 1 -> {5, 3, 3}: TP 2, FP 1, FN 1 -> F1 2/3
    assert got.loc[0, "a"] == pytest.approx(2 / 3, abs=1e-15)
    # b: best is x > -inf (all cells): 2*5 / (8 + 5)
    assert got.loc[0, "b"] == pytest.approx(10 / 13, abs=1e-15)
    # a perfect feature scores 1
    assert label_f1(sp.csr_matrix(y[:, None] * 2.0), pd.Series(y)).loc[0, True] == 1.0


@pytest.mark.parametrize("block", [None, (7, 7)])
def test_label_ami_matches_sklearn_binarised(monkeypatch, block):
    """ami = adjusted_mutual_info_score(labels, activation > 0) over non-missing cells, all values."""
    if block is not None:
        monkeypatch.setattr(analysis_mod, "_BLOCK_NNZ", block)
    rng = np.random.default_rng(11)
    n = 300
    X = _tricky_matrix(rng, n=n, m=20).tolil()
    X[:, 5] = 0.0
    X[:, 5] = 1.0  # active everywhere -> 0
    X[:, 6] = 0.0
    X[7, 6] = 2.0  # active in one cell
    X[:, 7] = 3.0
    X[3, 7] = 0.0  # inactive in one cell
    X = X.tocsr()
    labels = _labels_with_nan(rng, n)
    got = label_ami(X, labels)
    assert got.shape == (20,) and got.index.name == "feature_id"
    valid = labels.notna().to_numpy()
    D, lv = X.toarray()[valid], labels[valid].to_numpy()
    ref = [adjusted_mutual_info_score(lv, D[:, j] > 0) for j in range(D.shape[1])]
    np.testing.assert_allclose(got.to_numpy(), ref, rtol=0, atol=1e-10)
    assert got[0] == 0.0 and got[5] == 0.0  # never / always active


def test_label_ami_large_n_matches_sklearn():
    """Many cells: the expected MI sums only a window of the hypergeometric law."""
    rng = np.random.default_rng(12)
    n = 40_000
    labels = rng.choice(4, size=n, p=[0.6, 0.3, 0.099, 0.001])
    rates = [0.00005, 0.002, 0.05, 0.3, 0.5, 0.97, 0.9999]
    cols = [(rng.random(n) < r) * rng.random(n) for r in rates]
    cols.append((labels == 2) * (rng.random(n) < 0.8) * 1.0)  # tied to value 2
    X = sp.csc_matrix(np.stack(cols, axis=1))
    got = label_ami(X, labels).to_numpy()
    D = X.toarray()
    ref = [adjusted_mutual_info_score(labels, D[:, j] > 0) for j in range(D.shape[1])]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    assert got[-1] > 0.3


def test_label_scoring_all_metrics_columns():
    rng = np.random.default_rng(13)
    X = _tricky_matrix(rng, n=200, m=12)
    obs = pd.DataFrame({"cell_type": rng.choice(["T", "B", "NK"], 200), "batch": rng.choice([1.0, 2.0, np.nan], 200)})
    res = label_scoring(X, obs, ["cell_type", "batch"], min_cells=5, metrics=["auroc", "f1", "ami"])
    assert list(res.columns) == [
        "auroc:cell_type=B", "auroc:cell_type=NK", "auroc:cell_type=T", "best:cell_type", "best_auroc:cell_type",
        "f1:cell_type=B", "f1:cell_type=NK", "f1:cell_type=T", "ami:cell_type",
        "auroc:batch=1.0", "auroc:batch=2.0", "best:batch", "best_auroc:batch",
        "f1:batch=1.0", "f1:batch=2.0", "ami:batch",
    ]
    np.testing.assert_array_equal(res[["f1:batch=1.0", "f1:batch=2.0"]].to_numpy(),
                                  label_f1(X, obs["batch"], min_cells=5).to_numpy())
    np.testing.assert_array_equal(res["ami:cell_type"].to_numpy(), label_ami(X, obs["cell_type"]).to_numpy())
    only = label_scoring(X, obs, ["cell_type"], metrics=["ami"])
    assert list(only.columns) == ["ami:cell_type"]
    with pytest.raises(InputError, match="label_metrics"):
        label_scoring(X, obs, ["cell_type"], metrics=["auc"])


def test_batch_associated_flag():
    """batch_associated: max AUROC over batches > threshold AND > max AUROC over cell types."""
    rng = np.random.default_rng(14)
    n = 400
    ct = np.tile(["A", "B"], n // 2)
    batch = np.repeat(["b1", "b2"], n // 2)  # balanced against cell type
    noise = rng.random(n)
    cols = [
        (batch == "b1") * (1 + noise),  # 0: pure batch feature -> flagged
        (ct == "A") * (1 + noise),  # 1: pure cell-type feature -> not flagged
        ((ct == "A") * 2.0 + (batch == "b1")) * (1 + 0.01 * noise),  # 2: both, cell type stronger -> not flagged
        ((batch == "b1") * 2.0 + (ct == "A")) * (1 + 0.01 * noise),  # 3: both, batch stronger -> flagged
        ((batch == "b1") & (noise < 0.3)) * 1.0,  # 4: weak batch (AUROC 0.65) -> flagged only at threshold 0.6
    ]
    X = sp.csr_matrix(np.stack(cols, axis=1))
    obs = pd.DataFrame({"cell_type": ct, "batch": batch})
    res = label_scoring(X, obs, ["cell_type", "batch"], batch_key="batch", cell_type_key="cell_type")
    assert res["batch_associated"].dtype == bool
    assert res["batch_associated"].tolist() == [True, False, False, True, False]
    b, c = res["best_auroc:batch"].to_numpy(), res["best_auroc:cell_type"].to_numpy()
    np.testing.assert_array_equal(res["batch_associated"].to_numpy(), (b > 0.7) & (b > c))
    low = label_scoring(X, obs, ["cell_type"], batch_key="batch", cell_type_key="cell_type",
                        batch_auroc_threshold=0.6)
    assert low["batch_associated"].tolist() == [True, False, False, True, True]
    assert not any(col.endswith("batch") or "batch=" in col for col in low.columns if col != "batch_associated")
    no_ct = label_scoring(X, obs, [], batch_key="batch", batch_auroc_threshold=0.7)
    assert list(no_ct.columns) == ["batch_associated"]
    # without cell types only the threshold counts: feature 2 has AUROC(b1) = 0.75
    assert no_ct["batch_associated"].tolist() == [True, False, True, True, False]
    assert "batch_associated" not in label_scoring(X, obs, ["cell_type"]).columns
    with pytest.raises(InputError, match="batch_key_typo"):
        label_scoring(X, obs, ["cell_type"], batch_key="batch_key_typo")


def test_canonical_csc_input_not_modified():
    rng = np.random.default_rng(15)
    X = _tricky_matrix(rng, n=100, m=8).tocsc()
    X.sum_duplicates()
    before = (X.data.copy(), X.indices.copy(), X.indptr.copy())
    label_scoring(X, pd.DataFrame({"c": rng.choice(["a", "b"], 100)}), ["c"], metrics=["auroc", "f1", "ami"])
    for a, b in zip(before, (X.data, X.indices, X.indptr)):
        np.testing.assert_array_equal(a, b)
