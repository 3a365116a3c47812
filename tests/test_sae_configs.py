"""One source of hyperparameter defaults (the config dataclass beside each SAE class), checked
keys and types through the Python API and Hydra, and the open registry of architectures."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import sae4scfm
from sae4scfm.errors import InputError
from sae4scfm.saes import (
    ARCHITECTURES,
    GatedSAE,
    JumpReLUSAE,
    StandardConfig,
    StandardSAE,
    TopKSAE,
    build_sae,
    load_sae,
)
from sae4scfm.saes.config import YAML_DIR, check_sae_overrides, knob, yaml_text
from sae4scfm.saes.interop import export_saelens, saelens_exportable

ROOT = Path(__file__).resolve().parents[1]
EIGHT = ("standard", "topk", "batchtopk", "matryoshka", "gated", "jumprelu", "p_anneal", "gated_anneal")


def test_the_eight_are_registered_with_a_yaml_file_each():
    assert set(EIGHT) <= set(ARCHITECTURES)
    assert {p.stem for p in YAML_DIR.glob("*.yaml")} == set(EIGHT)


@pytest.mark.parametrize("arch", EIGHT)
def test_yaml_is_generated_from_the_config_class(arch):
    """config/sae/<arch>.yaml holds no second copy of a default: it is the text generated from the
    dataclass (values and comments). On failure: python -m sae4scfm.saes."""
    cls = ARCHITECTURES[arch]
    assert (YAML_DIR / f"{arch}.yaml").read_text() == yaml_text(cls), "run: python -m sae4scfm.saes"
    for f in dataclasses.fields(cls.config_class):  # every knob documented
        assert len(f.metadata["doc"]) > 10, f.name


@pytest.mark.parametrize("arch", EIGHT)
def test_python_api_and_hydra_defaults_are_identical(arch):
    hydra = OmegaConf.to_container(sae4scfm.compose("train", [f"sae={arch}"]).sae.hyperparams, resolve=True)
    cls = ARCHITECTURES[arch]
    assert hydra == cls.config_class().to_dict()
    via_build = build_sae(arch, 16, 64, hydra)
    via_constructor = cls(16, 64)
    assert via_build.cfg == via_constructor.cfg == cls.config_class()
    assert via_build.hyperparams == {k: v for k, v in hydra.items() if k != "lr"} == via_constructor.hyperparams


def test_constructor_defaults_are_the_documented_ones():
    """The defaults the README's figures were measured with (they disagreed before: k 32 vs 16,
    l1_coeff 1.0 vs 2.5 and 5.0, init_threshold 1.5 vs 1.25)."""
    assert TopKSAE(16, 64).k == 16 and ARCHITECTURES["batchtopk"](16, 64).k == 16
    assert StandardSAE(16, 64).l1_coeff == 2.5 and GatedSAE(16, 64).l1_coeff == 5.0
    assert ARCHITECTURES["p_anneal"](16, 64).cfg.l1_coeff == 3.0
    assert ARCHITECTURES["gated_anneal"](16, 64).resample_every == 250
    assert torch.allclose(JumpReLUSAE(16, 64).threshold, torch.full((64,), 1.25))
    assert TopKSAE(16, 64, k=8).k == 8  # keywords still override


@pytest.mark.parametrize("make", [lambda: build_sae("topk", 16, 64, {"k": 8, "kk": 3}),
                                  lambda: TopKSAE(16, 64, kk=3),
                                  lambda: check_sae_overrides(["sae=topk", "sae.hyperparams.kk=3"]),
                                  lambda: check_sae_overrides(["+sae.hyperparams.kk=3"])],
                         ids=["build_sae", "constructor", "override", "append_override"])
def test_unknown_key_names_key_architecture_and_valid_keys(make):
    with pytest.raises(InputError, match=r"sae\.hyperparams\.kk is not a hyperparameter of architecture 'topk'; "
                                         r"valid keys: lr, k, auxk_alpha, aux_k\."):
        make()


def test_overrides_of_valid_keys_pass_and_use_the_chosen_architecture():
    check_sae_overrides(["sae.hyperparams.k=8", "train.n_epochs=1"])  # topk: train.yaml's default
    check_sae_overrides(["sae=standard", "sae.hyperparams.l1_coeff=3"])
    with pytest.raises(InputError, match="architecture 'standard'"):  # every architecture of a multirun
        check_sae_overrides(["-m", "sae=topk,standard", "sae.hyperparams.k=4,8"])
    cfg = sae4scfm.compose("train", ["sae.hyperparams.k=8"])
    assert build_sae(cfg.sae.architecture, 16, 64, OmegaConf.to_container(cfg.sae.hyperparams)).k == 8


@pytest.mark.parametrize(("arch", "hp", "message"), [
    ("topk", {"k": "abc"}, r"sae\.hyperparams\.k='abc' must be int \(architecture 'topk', default 16\)"),
    ("topk", {"k": 8.5}, r"k=8\.5 must be int"),
    ("topk", {"k": True}, r"k=True must be int"),
    ("topk", {"aux_k": "x"}, r"aux_k='x' must be int or null"),
    ("standard", {"l1_coeff": "high"}, r"l1_coeff='high' must be float"),
    ("standard", {"decoder_norm_l1": 1}, r"decoder_norm_l1=1 must be bool"),
    ("matryoshka", {"group_fractions": 0.5}, r"group_fractions=0\.5 must be a list of float"),
    ("matryoshka", {"group_fractions": [0.5, "a"]}, r"must be a list of float"),
])
def test_wrong_types_are_rejected(arch, hp, message):
    with pytest.raises(InputError, match=message):
        build_sae(arch, 16, 64, hp)


def test_ints_are_floats_and_lists_are_tuples():
    sae = build_sae("matryoshka", 16, 64, {"auxk_alpha": 0, "group_fractions": [0.25, 0.75]})
    assert sae.cfg.auxk_alpha == 0.0 and isinstance(sae.cfg.auxk_alpha, float)
    assert sae.cfg.group_fractions == (0.25, 0.75) and sae.hyperparams["group_fractions"] == [0.25, 0.75]
    assert sae.group_ends == [16, 64]


@pytest.mark.parametrize("override", ["sae.hyperparams.kk=3", "+sae.hyperparams.kk=3"])
def test_cli_prints_one_error_line_for_an_unknown_key(tmp_path, override):
    """A plain override (which Hydra's struct check would reject with its own message, exit 1) and an
    appended one (which would pass it) are both one ``error:`` line naming the valid keys (exit 2)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_sae.py"), "sae=topk", override,
                           "data.n_cells=200", "wandb.mode=disabled", f"runs_dir={tmp_path}",
                           f"buffer.store_dir={tmp_path / 'store'}"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: sae.hyperparams.kk is not a hyperparameter of architecture 'topk'; valid keys: lr, k, auxk_alpha, " \
           "aux_k." in proc.stderr.splitlines()


def test_load_sae_names_the_cfg_json_of_a_bad_key(tmp_path):
    TopKSAE(16, 64, k=4).save(tmp_path, {})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "hyperparams": {**cfg["hyperparams"], "kay": 4}}))
    with pytest.raises(InputError, match=rf"^{tmp_path / 'cfg.json'}: sae\.hyperparams\.kay is not"):
        load_sae(tmp_path)


# --- the open registry --------------------------------------------------------------------------

@pytest.fixture
def registered():
    """Names the test registers; removed from ARCHITECTURES afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        ARCHITECTURES.pop(name, None)


def test_a_new_architecture_needs_only_a_subclass(registered, tmp_path):
    """Defined here, nowhere else: built by name, saved and loaded, its config checked, its YAML
    generated; it keeps the standard SAE's inference, so it exports to SAELens as 'standard'."""

    @dataclass(frozen=True)
    class ShrinkConfig(StandardConfig):
        """Standard SAE whose L1 coefficient shrinks (test)."""

        shrink: float = knob(0.5, "factor on l1_coeff")

    class ShrinkSAE(StandardSAE):
        architecture = "test_shrink"
        config_class = ShrinkConfig

        def __init__(self, d_in, d_sae, cfg=None, **hyperparams):
            super().__init__(d_in, d_sae, cfg, **hyperparams)
            self.l1_coeff = self.cfg.l1_coeff * self.cfg.shrink

    registered.append("test_shrink")
    sae = build_sae("test_shrink", 16, 64, {"shrink": 0.25, "lr": 1e-3})
    assert type(sae) is ShrinkSAE and sae.l1_coeff == 2.5 * 0.25
    with torch.no_grad():
        sae.b_enc.normal_()
    sae.save(tmp_path, {"layer": 2})
    loaded, meta = load_sae(tmp_path)
    assert type(loaded) is ShrinkSAE and meta["hyperparams"] == {"l1_coeff": 2.5, "decoder_norm_l1": False,
                                                                 "shrink": 0.25}
    x = torch.randn(32, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and loaded.l1_coeff == sae.l1_coeff
    with pytest.raises(InputError, match="architecture 'test_shrink'; valid keys: lr, l1_coeff, decoder_norm_l1, "
                                         "shrink"):
        build_sae("test_shrink", 16, 64, {"k": 3})
    assert "\n  shrink: 0.5            # factor on l1_coeff\n" in yaml_text(ShrinkSAE)
    assert saelens_exportable(ShrinkSAE)
    saved = json.loads((export_saelens(tmp_path, tmp_path / "lens") / "cfg.json").read_text())
    assert saved["architecture"] == "standard" and saved["metadata"]["sae4scfm"]["architecture"] == "test_shrink"


def test_a_name_cannot_be_taken_twice(registered):
    with pytest.raises(TypeError, match=r"'topk' of .*Clash is already registered by sae4scfm\.saes\.topk\.TopKSAE"):
        class Clash(StandardSAE):
            architecture = "topk"
    assert ARCHITECTURES["topk"] is TopKSAE
