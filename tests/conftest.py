"""Shared fixtures: one real end-to-end run of the default small configuration.

The demo model is built once into the cache ($SAE4SCFM_CACHE, else the user cache
dir) and reused across sessions; everything else is written under pytest's tmp dirs.
Each test runs in an empty working directory of its own, so a test that reads or writes
a path relative to the working directory fails everywhere, not only outside the repo:
use ``REPO_ROOT`` (or the ``repo_root`` fixture) for files of the repository. A skip for
a missing module fails the run (``tests/skip_guard.py``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

import sae4scfm
from tests.skip_guard import MissingModuleSkips

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: scripts/, benchmarks/, README.md

# The README's example configuration (small enough for 2 CPU cores).
SMALL_RUN = [
    "scfm=demo", "data=pbmc", "sae=topk", "sae.target_layer=2", "sae.dictionary_multiplier=4",
    "sae.hyperparams.k=16", "sae.hyperparams.lr=3e-4", "seed=0", "data.n_cells=500",
    "data.preprocess.split=0.2", "data.preprocess.subset_hvg=true", "wandb.mode=disabled",
]


def pytest_configure(config):
    config.pluginmanager.register(MissingModuleSkips(), "sae4scfm-missing-module-skips")


SHORTENED = pytest.StashKey[tuple]()  # (the shortened recipe's build process, its folder)


def _uses_shortened_recipe(item) -> bool:
    return "shortened_recipe" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The tests that wait for the shortened recipe run last, so that it trains beside all the others."""
    items.sort(key=_uses_shortened_recipe)  # stable: the others keep their order


def pytest_collection_finish(session):
    """Start the shortened demo recipe (minutes on one pinned thread) when a collected test uses it, so it
    trains on the second core beside the tests before it (``shortened_recipe``)."""
    if any(_uses_shortened_recipe(item) for item in session.items):
        from sae4scfm.scfm.demo import start_build
        from tests.test_demo import SHORTENED_RECIPE

        root = Path(tempfile.mkdtemp(prefix="sae4scfm-shortened-recipe-"))
        (root / "build").mkdir()
        session.config.stash[SHORTENED] = (start_build(SHORTENED_RECIPE, root / "build", log=root / "build.log"), root)


def pytest_sessionfinish(session):
    """Stop a shortened-recipe build no test waited for (a run cut short by -x or ^C) and delete its folder."""
    child, root = session.config.stash.get(SHORTENED, (None, None))
    if child is not None:
        if child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shortened_recipe(request):
    """The report of the shortened demo recipe started at collection (``pytest_collection_finish``)."""
    from sae4scfm.scfm.demo import finish_build

    child, root = request.config.stash[SHORTENED]
    return finish_build(child, root / "build", root / "build.log")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(autouse=True)
def _cwd_is_empty_tmp_dir(tmp_path_factory, monkeypatch):
    """Each test runs in a fresh empty directory (not ``tmp_path``, which stays the test's own)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


@pytest.fixture(scope="session")
def small_run(runs_dir, store_dir):
    """(train config, run dir) of a trained small run, with features and label scoring done."""
    cfg = sae4scfm.compose("train", [*SMALL_RUN, f"runs_dir={runs_dir}", f"buffer.store_dir={store_dir}",
                                     "experiment=small"])
    run_dir = sae4scfm.train(cfg)
    address = [f"runs_dir={runs_dir}", "sae_checkpoint.experiment=small", f"sae_checkpoint.timestamp={run_dir.name}"]
    sae4scfm.generate_features(sae4scfm.compose("features", address))
    sae4scfm.analyze_features(sae4scfm.compose("analyze", [*address, "analysis.run_label_scoring=true"]))
    return cfg, run_dir


def assert_rejects_log_values_and_foreign_ids(adapter, adata) -> None:
    """A symbol-based adapter rejects log-normalised values passed as counts and Ensembl IDs."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from sae4scfm.errors import InputError

    logged = adata.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data)
    with pytest.raises(InputError, match="non-integer"):
        adapter.tokenize(logged, input_kind="counts")
    ensembl = ad.AnnData(adata.X.copy(), var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(adata.n_vars)]))
    with pytest.raises(InputError, match="none of"):
        adapter.tokenize(ensembl)
