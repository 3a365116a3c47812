"""data=soma / census / covid: a local SOMA experiment written from built-in data reads back equal to it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

import sae4scfm
from sae4scfm.data import load_dataset, load_pbmc
from sae4scfm.errors import InputError

tiledbsoma_io = pytest.importorskip("tiledbsoma.io")  # a missing module fails the run (skip_guard)


def write_soma(adata, folder) -> str:
    """``adata`` as a SOMA experiment in ``folder`` (measurement RNA, X layer "raw"); its URI."""
    uri = str(folder / "experiment")
    tiledbsoma_io.from_anndata(uri, adata, measurement_name="RNA", X_layer_name="raw")
    return uri


@pytest.fixture(scope="module")
def pbmc():
    adata = load_pbmc()
    adata.var["feature_name"] = adata.var_names.to_numpy()  # symbols, as the Census's var has them
    return adata


@pytest.fixture(scope="module")
def soma_uri(pbmc, tmp_path_factory) -> str:
    """The built-in PBMC cells (X = counts) as a SOMA experiment."""
    return write_soma(pbmc, tmp_path_factory.mktemp("soma"))


def soma_cfg(uri: str, *overrides: str, **fields):
    cfg = sae4scfm.compose("train", ["data=soma", f"data.uri={uri}", *overrides]).data
    for key, value in fields.items():  # filters hold quotes and '==' that Hydra's override grammar rejects
        OmegaConf.update(cfg, key, value)
    return cfg


def test_soma_reads_back_values_obs_var_in_chunks(soma_uri, pbmc):
    cfg = soma_cfg(soma_uri, "data.chunk_cells=64", "data.cell_type_key=bulk_labels", "data.obs_columns=[phase]")
    adata = load_dataset(cfg)
    assert adata.shape == pbmc.shape == (700, 765)
    assert (adata.X != pbmc.X).nnz == 0 and adata.X.dtype == np.float32
    assert list(adata.obs_names) == list(pbmc.obs_names) and list(adata.var_names) == list(pbmc.var_names)
    assert (adata.var["feature_name"].to_numpy() == pbmc.var_names.to_numpy()).all()
    # only the columns asked for (plus soma_joinid and the split), with their values
    assert set(adata.obs.columns) == {"soma_joinid", "bulk_labels", "phase", "split"}
    assert (adata.obs["bulk_labels"].astype(str).to_numpy() == pbmc.obs["bulk_labels"].astype(str).to_numpy()).all()
    assert (adata.obs["split"] == "eval").sum() == 140


def test_soma_filter_and_subsample_select_the_same_cells_as_anndata(soma_uri, pbmc):
    adata = load_dataset(soma_cfg(soma_uri, "data.chunk_cells=50",
                                  obs_value_filter="bulk_labels == 'CD14+ Monocyte' and n_genes > 300"))
    want = (pbmc.obs["bulk_labels"] == "CD14+ Monocyte") & (pbmc.obs["n_genes"] > 300)
    assert 0 < adata.n_obs == int(want.sum()) < 700
    assert list(adata.obs_names) == list(pbmc.obs_names[want.to_numpy()])
    assert (adata.X != pbmc[want.to_numpy()].X).nnz == 0
    # n_cells + seed draw the same cells as the in-memory built-in set does
    sub = load_dataset(soma_cfg(soma_uri, "data.n_cells=123", "seed=5"))
    ref = load_dataset(sae4scfm.compose("train", ["data=pbmc", "data.n_cells=123", "seed=5"]).data)
    assert list(sub.obs_names) == list(ref.obs_names) and (sub.X != ref.X).nnz == 0
    genes = load_dataset(soma_cfg(soma_uri, var_value_filter="feature_name in ['LYZ', 'MS4A1', 'NO_SUCH_GENE']"))
    assert list(genes.var_names) == ["MS4A1", "LYZ"]  # in the experiment's gene order
    assert (genes.X != pbmc[:, genes.var_names].X).nnz == 0


def test_soma_rows_read_out_of_order(soma_uri, pbmc):
    from sae4scfm.data.soma import select_cells

    cells, _, _ = select_cells(soma_cfg(soma_uri))
    rows = np.array([699, 3, 350, 0, 3])
    assert (cells.read_X(rows) != pbmc.X[rows]).nnz == 0
    cells.close()


@pytest.mark.parametrize("overrides, fields, message", [
    (["data.uri=/no/such/experiment"], {}, "data.uri=/no/such/experiment: not a TileDB-SOMA experiment"),
    (["data.measurement=ATAC"], {}, "data.measurement='ATAC': .* has no such measurement; valid: RNA."),
    (["data.layer=counts"], {}, "data.layer='counts': .* has no X layer 'counts'; valid: raw."),
    ([], {"obs_value_filter": "bulk_labels == 'no such type'"}, "selects no cells"),
    ([], {"obs_value_filter": "no_column == 1"}, "data.obs_value_filter=.* could not be applied"),
    (["data.obs_columns=[tissue]"], {}, "data.obs_columns: obs of .* has no column 'tissue'; available: "),
    (["data.cell_type_key=cell_type"], {}, "data.cell_type_key='cell_type': .* has no obs column"),
    (["data.uri=null"], {}, "data.uri is not set; run with data=soma data.uri="),
    (["data.chunk_cells=-1"], {}, "data.chunk_cells=-1: use a positive number"),
])
def test_soma_bad_input_is_one_clear_line(soma_uri, overrides, fields, message):
    uri = [] if any(o.startswith("data.uri") for o in overrides) else [f"data.uri={soma_uri}"]
    cfg = sae4scfm.compose("train", ["data=soma", *uri, *overrides]).data
    for key, value in fields.items():
        OmegaConf.update(cfg, key, value)
    with pytest.raises(InputError, match=message) as err:
        load_dataset(cfg)
    assert "\n" not in str(err.value)


def test_bad_soma_uri_is_an_error_line_from_the_cli(tmp_path, repo_root):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(repo_root / "scripts" / "train_sae.py"), "data=soma",
                           f"data.uri={tmp_path / 'missing'}", "wandb.mode=disabled", f"runs_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "not a TileDB-SOMA experiment" in lines[0], proc.stderr[-2000:]


def test_census_preset_composes_and_offline_is_one_line(monkeypatch):
    cellxgene_census = pytest.importorskip("cellxgene_census")
    cfg = sae4scfm.compose("train", ["data=census", "data.census_version=2025-01-30"]).data
    assert (cfg.name, cfg.organism, cfg.measurement, cfg.layer, cfg.gene_key) == (
        "census", "homo_sapiens", "RNA", "raw", "feature_name")
    assert "tissue_general == 'blood'" in cfg.obs_value_filter and "is_primary_data == True" in cfg.obs_value_filter
    assert (cfg.cell_type_key, cfg.batch_key, cfg.condition_key) == ("cell_type", "donor_id", "disease")

    def offline(**kwargs):
        assert kwargs == {"census_version": "2025-01-30"}
        raise ConnectionError("Failed to resolve 'census.cellxgene.cziscience.com'")

    monkeypatch.setattr(cellxgene_census, "open_soma", offline)
    with pytest.raises(InputError, match=r"data=census: could not open CELLxGENE Census '2025-01-30' "
                                         r"\(ConnectionError: .*check the connection") as err:
        load_dataset(cfg)
    assert "\n" not in str(err.value)


def test_covid_preset_names_the_atlas_obs_keys(tmp_path, pbmc):
    cfg = sae4scfm.compose("train", ["data=covid"]).data
    assert (cfg.name, cfg.cell_type_key, cfg.batch_key, cfg.condition_key, cfg.gene_key) == (
        "h5ad", "cell_type", "donor_id", "disease", "feature_name")
    with pytest.raises(InputError, match="data.path is not set"):
        load_dataset(cfg)
    # a CELLxGENE-schema file (Ensembl var_names, symbols in feature_name) is read with the preset's keys
    atlas = pbmc[:60].copy()
    atlas.obs = atlas.obs.assign(cell_type=atlas.obs["bulk_labels"].astype(str), donor_id="D1",
                                 disease=np.where(np.arange(60) % 2, "COVID-19", "normal"))
    atlas.var_names = [f"ENSG{i:011d}" for i in range(atlas.n_vars)]
    atlas.write_h5ad(tmp_path / "covid.h5ad")
    adata = load_dataset(sae4scfm.compose("train", ["data=covid", f"data.path={tmp_path / 'covid.h5ad'}"]).data)
    assert adata.n_obs == 60 and set(adata.obs["disease"]) == {"COVID-19", "normal"}


def test_train_a_tiny_sae_streaming_from_soma(soma_uri, tmp_path):
    cfg = sae4scfm.compose("train", [
        "scfm=demo", "data=soma", f"data.uri={soma_uri}", "data.stream=true", "data.chunk_cells=40",
        "data.n_cells=100", "data.cell_type_key=bulk_labels", "data.preprocess.subset_hvg=true",
        "data.preprocess.n_hvg=256", "sae.target_layer=2", "sae.dictionary_multiplier=2", "sae.hyperparams.k=8",
        "train.n_epochs=1", "train.batch_size=256", "train.eval_max_cells=10", "wandb.mode=disabled",
        f"runs_dir={tmp_path / 'runs'}", f"buffer.store_dir={tmp_path / 'stores'}"])
    run_dir = sae4scfm.train(cfg)
    meta = json.loads((run_dir / "cfg.json").read_text())
    assert meta["d_in"] > 0 and meta["d_sae"] == 2 * meta["d_in"]
    evaluation = json.loads((run_dir / "eval.json").read_text())
    assert 0 < evaluation["fvu"] < 1  # learnt something from the streamed cells
    # the analyze stage reads the counts of a streamed run in chunks too: the same expression and library
    # sizes as the whole matrix loaded at once, and never that matrix
    from sae4scfm.analysis.run_data import open_run
    from sae4scfm.data import normalise_expression

    address = [f"runs_dir={tmp_path / 'runs'}", f"sae_checkpoint.experiment={run_dir.parent.name}",
               f"sae_checkpoint.timestamp={run_dir.name}"]
    sae4scfm.generate_features(sae4scfm.compose("features", [*address, "features.token_features=false"]))
    run = open_run(run_dir)
    expression, genes = run.expression()
    sizes = run.library_size()
    assert run.dataset().X is None and len(genes) > 100
    whole = load_dataset(OmegaConf.merge(run.run_cfg.data, {"stream": False}))
    np.testing.assert_allclose(sizes, np.asarray(whole.X.sum(axis=1)).ravel(), rtol=1e-6)
    want = normalise_expression(whole[:, genes].X, "counts", 1e4, True, "whole")
    assert abs(expression - want).max() < 1e-5 and expression.shape == (100, len(genes))
