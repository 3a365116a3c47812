"""Interoperability with SAELens (6.x on-disk format) and dictionary_learning (0.1.0 state dicts).

Neither library is imported here: the formats are read and written directly, so exporting and
importing work without them installed (they are test dependencies, used to check equivalence).

``export_saelens(run_dir, out_dir)``
    writes ``cfg.json`` + ``sae_weights.safetensors`` that ``sae_lens.SAE.load_from_disk`` loads
    with the same latents: standard / p_anneal → ``standard``, topk → ``topk``, jumprelu →
    ``jumprelu`` (threshold = exp(log_threshold)), batchtopk / matryoshka → ``jumprelu`` with the
    global threshold as every latent's threshold (SAELens' own convention for trained BatchTopK
    SAEs), gated / gated_anneal → ``gated`` (b_enc is SAELens' b_gate).
``import_saelens(path)``
    our SAE from such a folder (standard, topk, jumprelu, gated).
``import_dictionary_learning(path_or_state_dict, architecture)``
    our SAE from an ``ae.pt`` / state dict of AutoEncoder ("standard"), AutoEncoderTopK
    ("topk"), BatchTopKSAE ("batchtopk"), MatryoshkaBatchTopKSAE ("matryoshka"),
    JumpReluAutoEncoder ("jumprelu") or GatedAutoEncoder ("gated").

The conversions are hooks on the SAE classes (``saelens_architecture``, ``saelens_export``,
``from_saelens``, ``from_dictionary_learning``), so an architecture brings its own; this module
reads and checks the files. A malformed file (missing, unreadable, pickled objects beyond
tensors, missing or mis-shaped tensors, an unknown architecture) raises one ``InputError``
naming the file.

Our SAEs act on raw activations (the input scaling is folded in at the end of training), as do
SAELens SAEs with ``normalize_activations="none"`` and dictionary_learning checkpoints (whose
trainer calls ``scale_biases(norm_factor)`` before saving); so no scaling is exported.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae4scfm.atomic import atomic_write, atomic_write_json
from sae4scfm.errors import InputError
from sae4scfm.saes.base import ARCHITECTURES, SAE, fold_b_dec_into_b_enc, load_sae

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
SAELENS_VERSION = "6.0.0"  # the format written (SAELens ≥ 6 loads it)


class Tensors:
    """Tensors read from an outside checkpoint, given to the import hooks: ``t[key]`` is a float32
    tensor; a missing key or a non-tensor value raises an ``InputError`` naming ``source`` (the
    file) and ``kind`` (what it should be)."""

    def __init__(self, tensors: Mapping, source: str, kind: str):
        self.tensors, self.source, self.kind = dict(tensors), source, kind

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise InputError(f"{self.source} has no {key!r} tensor, so it is not a {self.kind} (its keys: "
                             f"{', '.join(map(str, sorted(self.tensors))) or 'none'}); pass a checkpoint of that kind.")
        value = self.tensors[key]
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{self.source}: {key!r} is a {type(value).__name__}, not a tensor; it is not a "
                             f"{self.kind}.")
        return value.detach().float()

    def scalar(self, key: str) -> torch.Tensor:
        """A one-element tensor as a 0-d tensor."""
        t = self[key]
        if t.numel() != 1:
            raise InputError(f"{self.source}: {key!r} has shape {list(t.shape)}, expected one number; it is not "
                             f"a {self.kind}.")
        return t.reshape(())

    def int(self, key: str) -> int:
        return int(self.scalar(key))

    def cfg_int(self, cfg: dict, key: str) -> int:
        """An integer entry of the cfg.json that came with these weights."""
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{Path(self.source).parent / SAELENS_CFG}: {key}={value!r} must be an integer; the "
                             f"file is not a SAELens {cfg.get('architecture')!r} config.")
        return value

    def saelens_base(self, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_enc, W_dec, b_enc, b_dec of a SAELens SAE, b_dec's subtraction before encoding folded
        into b_enc when the SAE was trained without it (``apply_b_dec_to_input: false``)."""
        W_enc, W_dec, b_enc, b_dec = (self[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec"))
        if not cfg.get("apply_b_dec_to_input", True):
            b_enc = fold_b_dec_into_b_enc(W_enc, b_enc, b_dec)
        return W_enc, W_dec, b_enc, b_dec


def _read_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable safetensors file ({e}); {fix}") from None


def _read_pt(path: Path, fix: str) -> dict:
    """A state dict from a torch.save file, loaded weights-only: pickled objects beyond tensors and
    plain containers (a whole nn.Module, custom classes) are refused, never unpickled."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path} is not a torch.save file (no zip archive: empty, truncated or another "
                             f"format); {fix}") from None
        if isinstance(e, pickle.UnpicklingError):
            raise InputError(f"{path} holds pickled Python objects beyond tensors (e.g. a whole nn.Module), "
                             f"which are never unpickled (they can run code); {fix}") from None
        raise InputError(f"{path} is not a readable torch.save file ({type(e).__name__}: {str(e).strip()[:120]}); "
                         f"{fix}") from None
    if not isinstance(sd, Mapping):
        raise InputError(f"{path} holds a {type(sd).__name__}, not a state dict; {fix}")
    return dict(sd)


def export_saelens(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the SAE of ``run_dir`` in SAELens' format into ``out_dir``; returns ``out_dir``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "sae.safetensors").is_file() or not (run_dir / "cfg.json").is_file():
        raise InputError(f"{run_dir} is not a run dir (sae.safetensors and cfg.json are needed); "
                         "pass the folder that `train` wrote.")
    sae, meta = load_sae(run_dir)
    arch = meta["architecture"]
    if not saelens_exportable(type(sae)):
        exportable = ", ".join(n for n, c in ARCHITECTURES.items() if saelens_exportable(c))
        raise InputError(f"architecture {arch!r} of {run_dir}/cfg.json cannot be exported to SAELens (its "
                         f"inference has no SAELens counterpart); exportable: {exportable}.")
    tensors, extra = sae.saelens_export()
    metadata = {
        "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
        "model_name": meta.get("model_family"),
        "hook_name": meta.get("hook_point"), "hook_layer": meta.get("layer"),
        "dataset_path": (meta.get("dataset") or {}).get("path") if isinstance(meta.get("dataset"), dict) else None,
        "sae4scfm": {"architecture": arch, "hyperparams": meta.get("hyperparams", {}),
                     "input_scaling": meta.get("input_scaling"), "run_dir": str(run_dir)},
    }
    cfg = {"architecture": sae.saelens_architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", **extra,
           "metadata": {k: v for k, v in metadata.items() if v is not None}}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / SAELENS_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(out_dir / SAELENS_CFG, cfg, default=str)
    return out_dir


def saelens_exportable(cls: type[SAE]) -> bool:
    """Whether ``cls`` has a SAELens counterpart: the class in its MRO that defines ``saelens_export``
    sets ``saelens_architecture``, and ``cls`` keeps that class's inference (pre_acts, encode,
    decode); e.g. p_anneal = standard, matryoshka = batchtopk, a new encode rule = not exportable."""
    owner = next((c for c in cls.__mro__ if "saelens_export" in vars(c)), SAE)
    return owner is not SAE and owner.saelens_architecture is not None and all(
        getattr(cls, m) is getattr(owner, m) for m in ("pre_acts", "encode", "decode"))


def _saelens_importers() -> dict[str, type[SAE]]:
    """SAELens architecture name -> the SAE class whose own ``from_saelens`` imports it."""
    return {c.saelens_architecture: c for c in ARCHITECTURES.values() if "from_saelens" in vars(c)}


def import_saelens(path: str | Path, norm_scaling_factor: float | None = None) -> SAE:
    """Our SAE from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    ``normalize_activations="expected_average_only_in"`` SAEs act on ``s · x``; pass that
    ``norm_scaling_factor`` s to fold it into the weights (``SAE.fold_input_scale``)."""
    path = Path(path)
    fix = "point import_saelens at a folder written by SAELens' save_model (cfg.json + sae_weights.safetensors)."
    if not path.is_dir():
        raise InputError(f"{path} is not a folder; {fix}")
    for name in (SAELENS_CFG, SAELENS_WEIGHTS):
        if not (path / name).is_file():
            raise InputError(f"{path / name} is missing; {fix}")
    try:
        cfg = json.loads((path / SAELENS_CFG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path / SAELENS_CFG} is not valid JSON ({e}); {fix}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path / SAELENS_CFG} holds a JSON {type(cfg).__name__}, not an object; {fix}")
    weights = _read_safetensors(path / SAELENS_WEIGHTS, fix)
    arch = cfg.get("architecture", "standard")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in"):
        raise InputError(f"{path / SAELENS_CFG}: normalize_activations={norm!r} is not supported; only 'none' "
                         "and 'expected_average_only_in' (with norm_scaling_factor) can be imported.")
    if norm == "expected_average_only_in" and norm_scaling_factor is None:
        raise InputError(f"{path / SAELENS_CFG}: normalize_activations='expected_average_only_in' needs the "
                         "SAE's norm_scaling_factor; pass import_saelens(path, norm_scaling_factor=...).")
    if cfg.get("reshape_activations", "none") != "none":
        raise InputError(f"{path / SAELENS_CFG}: reshape_activations={cfg['reshape_activations']!r} (attention "
                         "hook_z SAEs) cannot be imported; only 'none' is supported.")
    importers = _saelens_importers()
    if arch not in importers:
        raise InputError(f"{path / SAELENS_CFG}: SAELens architecture {arch!r} has no sae4scfm counterpart; "
                         f"importable: {', '.join(importers)}.")
    sae = importers[arch].from_saelens(Tensors(weights, str(path / SAELENS_WEIGHTS), f"SAELens {arch!r} SAE"), cfg)
    if norm == "expected_average_only_in":
        sae.fold_input_scale(float(norm_scaling_factor))
    return sae


def dictionary_learning_architectures() -> list[str]:
    """Our architectures with a dictionary_learning counterpart (their class defines the hook)."""
    return [n for n, c in ARCHITECTURES.items() if "from_dictionary_learning" in vars(c)]


def import_dictionary_learning(path_or_state_dict: str | Path | Mapping[str, torch.Tensor], architecture: str,
                               apply_b_dec_to_input: bool = False) -> SAE:
    """Our SAE from a dictionary_learning (0.1.0) checkpoint: a path to ``ae.pt`` or its state dict.

    ``architecture``: "standard" (AutoEncoder), "topk" (AutoEncoderTopK), "batchtopk"
    (BatchTopKSAE), "matryoshka" (MatryoshkaBatchTopKSAE), "jumprelu" (JumpReluAutoEncoder) or
    "gated" (GatedAutoEncoder). ``apply_b_dec_to_input`` is the
    JumpReluAutoEncoder attribute of that name (not saved in its state dict; False unless the
    SAE came from SAELens)."""
    importable = dictionary_learning_architectures()
    if architecture not in importable:
        raise InputError(f"architecture={architecture!r} is unknown; importable: {', '.join(importable)}.")
    fix = f"pass the ae.pt that dictionary_learning saved for a {architecture!r} SAE, or torch.save(ae.state_dict(), path)."
    if isinstance(path_or_state_dict, (str, Path)):
        p = Path(path_or_state_dict)
        if not p.is_file():
            raise InputError(f"{p} does not exist; {fix}")
        source, sd = str(p), _read_pt(p, fix)
    else:
        source, sd = "the state dict", dict(path_or_state_dict)
    kind = f"dictionary_learning {architecture!r} checkpoint"
    return ARCHITECTURES[architecture].from_dictionary_learning(Tensors(sd, source, kind), apply_b_dec_to_input)
