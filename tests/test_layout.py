"""The stage layout: importing a module of the former flat layout says where it moved."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from sae4scfm import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_names_say_where_they_moved(old):
    code = f"import sae4scfm.{old}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"ImportError: sae4scfm.{old} moved to {MOVED[old]}" in proc.stderr
    importlib.import_module(MOVED[old])  # the new home exists


def test_stage_functions_stay_at_the_top():
    import sae4scfm
    from sae4scfm.analysis.analyze import analyze_features
    from sae4scfm.features import generate_features
    from sae4scfm.training import train

    assert (sae4scfm.train, sae4scfm.generate_features, sae4scfm.analyze_features) == (
        train, generate_features, analyze_features)
    import sae4scfm.training  # noqa: F401  the subpackage does not shadow sae4scfm.train
    assert callable(sae4scfm.train)
