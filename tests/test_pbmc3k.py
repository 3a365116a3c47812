"""pbmc3k offline preset and marker-based annotation (real data needs `desc` installed)."""

import importlib.machinery
import importlib.util

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sae4scfm.data import pbmc3k as pbmc3k_mod
from sae4scfm.data.markers import annotate_by_markers, load_marker_sets
from sae4scfm.errors import InputError

HAS_DESC = importlib.util.find_spec("desc") is not None
needs_desc = pytest.mark.skipif(not HAS_DESC, reason="desc not installed: pip install --no-deps desc==2.1.1")


@pytest.fixture(scope="module")
def pbmc():
    return pbmc3k_mod.load_pbmc3k()


@pytest.fixture(scope="module")
def lognorm(pbmc):
    X = pbmc.X.multiply(1e4 / pbmc.obs["n_counts"].to_numpy()[:, None]).tocsr()
    X.data = np.log1p(X.data)
    return X


def _mean(pbmc, X, gene, mask):
    col = np.asarray(X[:, pbmc.var_names.get_loc(gene)].todense()).ravel()
    return col[mask].mean(), col[~mask].mean()


def test_marker_sets_resource():
    sets = load_marker_sets()
    expected = {"CD4 T", "CD8 T", "NK", "B", "CD14 Monocyte", "FCGR3A Monocyte",
                "Dendritic (cDC)", "pDC", "Megakaryocyte-Platelet"}
    assert expected <= set(sets)
    assert not any(k.startswith("_") for k in sets)
    for name, genes in sets.items():
        assert 5 <= len(genes) <= 15, name
        assert len(set(genes)) == len(genes), name
        assert "/" not in name, name  # set names become HDF5 keys


@needs_desc
def test_shape_counts_ids(pbmc):
    assert pbmc.shape == (2700, 32738)
    assert sp.isspmatrix_csr(pbmc.X) and pbmc.X.dtype == np.float32
    assert np.array_equal(pbmc.X.data, np.round(pbmc.X.data)) and pbmc.X.data.min() >= 1
    assert pbmc.var_names.is_unique and pbmc.obs_names.is_unique
    assert pbmc.var["ensembl_id"].str.match(r"^ENSG\d{11}$").all()
    assert {"CD3E", "MS4A1", "LYZ"} <= set(pbmc.var["gene_symbol"])
    np.testing.assert_allclose(pbmc.obs["n_counts"], np.asarray(pbmc.X.sum(1)).ravel())
    assert pbmc.obs["n_counts"].min() > 0


@needs_desc
def test_derived_labels(pbmc, lognorm):
    labels = pbmc.obs["cell_type_derived"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    counts = labels.value_counts()
    assert (counts.drop("unassigned", errors="ignore") >= 20).sum() >= 6, counts.to_dict()
    assert counts.get("unassigned", 0) < 0.05 * pbmc.n_obs
    meta = pbmc.uns["cell_type_derived"]
    assert meta["derived"] is True and "not ground truth" in meta["note"] and meta["method"]

    lab = labels.to_numpy()
    b_in, b_out = _mean(pbmc, lognorm, "MS4A1", lab == "B")
    assert b_in > 5 * b_out
    for gene in ("CD14", "LYZ"):
        by_type = {t: _mean(pbmc, lognorm, gene, lab == t)[0] for t in counts.index if counts[t] >= 20}
        assert max(by_type, key=by_type.get) == "CD14 Monocyte", (gene, by_type)
    for gene in ("GNLY", "NKG7"):
        nk, rest = _mean(pbmc, lognorm, gene, lab == "NK")
        assert nk > 3 * rest, gene
    cd8, rest = _mean(pbmc, lognorm, "CD8A", lab == "CD8 T")
    assert cd8 > 3 * rest
    fc, rest = _mean(pbmc, lognorm, "FCGR3A", lab == "FCGR3A Monocyte")
    assert fc > 3 * rest


@needs_desc
def test_h5ad_roundtrip(pbmc, tmp_path):
    path = tmp_path / "pbmc3k.h5ad"
    pbmc.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.uns["cell_type_derived"]["derived"]
    assert (back.obs["cell_type_derived"] == pbmc.obs["cell_type_derived"]).all()


def _toy(n_per=30, seed=0):
    """3 groups x 30 cells, 400 genes with log-normal mean counts; group g has +20 counts on its 3 markers.

    score_genes draws expression-matched control genes, so the toy needs a realistic
    background of many genes spanning expression levels.
    """
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(400)]
    rates = np.exp(rng.normal(0.0, 1.5, size=400))
    X = rng.poisson(rates, size=(3 * n_per, 400)).astype(np.float32)
    truth = np.repeat(["A", "B", "C"], n_per)
    for g, cols in zip("ABC", ([0, 1, 2], [3, 4, 5], [6, 7, 8])):
        X[np.ix_(truth == g, cols)] += rng.poisson(20.0, size=(n_per, 3))
    adata = ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=[f"c{i}" for i in range(3 * n_per)]),
                       var=pd.DataFrame(index=genes))
    markers = {"A": ["G0", "G1", "G2", "NOT_A_GENE"], "B": ["G3", "G4", "G5"], "C": ["G6", "G7", "G8"],
               "Empty": ["MISSING1", "MISSING2"]}
    return adata, markers, truth


@pytest.mark.parametrize("smooth", [None, 5])
def test_annotate_toy(smooth, caplog):
    adata, markers, truth = _toy()
    X_before = adata.X.copy()
    annotate_by_markers(adata, markers, key_added="ct", smooth_neighbors=smooth)
    assert (adata.obs["ct"].astype(str).to_numpy() == truth).all()
    assert (adata.X != X_before).nnz == 0  # counts untouched
    assert "Empty" in caplog.text and "Empty" not in adata.uns["ct"]["markers_used"]
    assert adata.uns["ct"]["markers_used"]["A"] == ["G0", "G1", "G2"]
    assert adata.uns["ct"]["derived"] is True
    # deterministic
    again = adata.copy()
    annotate_by_markers(again, markers, key_added="ct", smooth_neighbors=smooth)
    np.testing.assert_array_equal(again.obsm["ct_scores"].to_numpy(), adata.obsm["ct_scores"].to_numpy())


def test_annotate_unassigned_threshold():
    adata, markers, _ = _toy()
    annotate_by_markers(adata, markers, min_score=1e9, smooth_neighbors=None)
    assert (adata.obs["cell_type_derived"] == "unassigned").all()


def test_annotate_layer_and_no_markers():
    adata, markers, truth = _toy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)
    annotate_by_markers(adata, markers, layer="counts", smooth_neighbors=None)
    assert (adata.obs["cell_type_derived"].astype(str).to_numpy() == truth).all()
    with pytest.raises(ValueError):
        annotate_by_markers(adata, {"X": ["NOPE"]}, layer="counts")


def test_missing_desc_gives_input_error(monkeypatch):
    monkeypatch.setattr(pbmc3k_mod.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(InputError, match=r"pip install --no-deps desc==2\.1\.1"):
        pbmc3k_mod.load_pbmc3k()


def test_desc_without_file_gives_input_error(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("desc", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(pbmc3k_mod.importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(InputError, match="pbmc.h5ad"):
        pbmc3k_mod.load_pbmc3k()


@needs_desc
def test_pbmc3k_preset_feeds_the_demo_model():
    """data=pbmc3k goes through the same loader, split and tokenizer as the default."""
    import sae4scfm
    from sae4scfm.data import load_dataset
    from sae4scfm.scfm import load_scfm
    from sae4scfm.scfm.loading import tokenize_dataset

    cfg = sae4scfm.compose("train", ["data=pbmc3k", "data.n_cells=300"])
    adata = load_dataset(cfg.data)
    assert adata.n_obs == 300 and set(adata.obs["split"]) == {"train", "eval"}
    assert "cell_type_derived" in adata.obs
    adapter = load_scfm(cfg.scfm)
    tokens = tokenize_dataset(adapter, adata, cfg.data)
    assert len(tokens) == 300
    # symbols match the demo vocabulary: most of the 765 PBMC genes are found and expressed
    assert 100 < np.median(tokens.lengths) < 765
