"""Layer profile: one SAE per residual-stream layer of the demo (0..4) and its random-init twin, the
enriched-feature fraction per layer as a table, markdown and figure; a rerun reuses every run."""

from __future__ import annotations

import pandas as pd
import pytest

import sae4scfm
from sae4scfm.analysis.layer_profile import layer_profile
from sae4scfm.errors import InputError

# 200 cells, 128 TopK latents, one epoch per layer: every layer of the 4-block demo, trained and control.
TINY_PROFILE = [
    "scfm=demo", "data=pbmc", "sae=topk", "sae.dictionary_multiplier=1", "sae.hyperparams.k=8", "seed=0",
    "data.n_cells=200", "data.preprocess.split=0.3", "data.preprocess.subset_hvg=true", "wandb.mode=disabled",
    "train.n_epochs=1", "train.batch_size=256", "train.calibration_batches=4", "train.eval_max_cells=10",
    "layer_profile.gene_sets=[markers]", "experiment=profile",
]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    runs = tmp_path_factory.mktemp("profile_runs")
    overrides = [*TINY_PROFILE, f"runs_dir={runs}", f"buffer.store_dir={runs / 'stores'}"]
    return runs, overrides, layer_profile(sae4scfm.compose("layer_profile", overrides))


def test_profile_has_every_layer_trained_and_control(profiled):
    import json

    from sae4scfm.analysis.results import read_results
    from sae4scfm.runs import load_run_config

    runs, _, profile = profiled
    assert list(profile.columns) == ["layer", "metric", "label", "trained", "control", "trained_beats_control"]
    frac = profile[profile["metric"] == "enriched_fraction"].set_index("layer")
    assert frac.index.tolist() == [0, 1, 2, 3, 4] and set(frac["label"]) == {"markers"}
    assert frac[["trained", "control"]].stack().between(0, 1).all()
    assert profile["trained_beats_control"].tolist() == (profile["trained"] > profile["control"]).tolist()
    for layer in range(5):
        for exp, random_init in (("profile", False), ("profile-random_init", True)):
            run_dir = runs / exp / f"layer_{layer}"
            assert json.loads((run_dir / "cfg.json").read_text())["layer"] == layer
            assert load_run_config(run_dir).scfm.random_init is random_init
            fdr = read_results(run_dir / "analysis")[("enrichment", "fdr:markers")].to_numpy(dtype=float)
            column = "control" if random_init else "trained"
            assert frac.loc[layer, column] == pytest.approx((fdr < 0.05).mean())
    # the control's numbers are its own at every layer past the embeddings
    assert (frac.loc[1:, "trained"] != frac.loc[1:, "control"]).any()
    auc = profile[(profile["metric"] == "heldout_auroc") & (profile["label"] == "mean")]
    assert auc["layer"].tolist() == [0, 1, 2, 3, 4] and auc[["trained", "control"]].stack().between(0, 1).all()


def test_profile_files(profiled):
    runs, _, profile = profiled
    out = runs / "profile"
    written = pd.read_csv(out / "layer_profile.csv", keep_default_na=False, dtype={"label": str})
    pd.testing.assert_frame_equal(written, profile.reset_index(drop=True), check_dtype=False)
    md = (out / "layer_profile.md").read_text().splitlines()
    assert md[0].startswith("| layer | enriched_fraction:markers trained | enriched_fraction:markers control")
    frac = profile[profile["metric"] == "enriched_fraction"].set_index("layer")
    assert md[2].startswith(f"| 0 | {frac.loc[0, 'trained']:.3f} | {frac.loc[0, 'control']:.3f} |")
    assert len(md) == 2 + 5
    assert (out / "layer_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_every_run(profiled, capsys):
    runs, overrides, profile = profiled
    sae_files = sorted(runs.glob("profile*/layer_*/sae.safetensors"))
    assert len(sae_files) == 10
    stamps = {p: p.stat().st_mtime_ns for p in sae_files}
    again = layer_profile(sae4scfm.compose("layer_profile", [*overrides, "layer_profile.layers=[4,2]"]))
    assert "training " not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in sae_files} == stamps
    assert again["layer"].unique().tolist() == [2, 4]
    pd.testing.assert_frame_equal(again.reset_index(drop=True),
                                  profile[profile["layer"].isin([2, 4])].reset_index(drop=True))
    # another SAE config under the same experiment is refused, not silently mixed in
    with pytest.raises(InputError, match="layer_2 holds a run of another config.*delete it to retrain"):
        layer_profile(sae4scfm.compose("layer_profile", [*overrides, "layer_profile.layers=[2]",
                                                         "sae.hyperparams.k=4"]))


def test_bad_layers_are_refused_before_training(tmp_path):
    with pytest.raises(InputError, match="layer_profile.layers=5 is out of range.*0 \\(embeddings\\) to 4"):
        layer_profile(sae4scfm.compose("layer_profile", [f"runs_dir={tmp_path}", "layer_profile.layers=[0,5]"]))
    with pytest.raises(InputError, match="layer_profile.control='trained'"):
        layer_profile(sae4scfm.compose("layer_profile", [f"runs_dir={tmp_path}", "layer_profile.control=trained"]))
    assert not any(tmp_path.iterdir())


def test_compose_works_inside_a_running_hydra_app():
    """Defect: sae4scfm.compose (used by the control's feature generation) raised 'GlobalHydra is already
    initialized' under an entry point (sae4scfm-analyze, scripts/layer_profile.py)."""
    from hydra import initialize_config_dir

    import sae4scfm
    from sae4scfm.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = sae4scfm.compose("features", ["features.token_features=false"])
    assert cfg.features.token_features is False and cfg.features.batch_size == 32
