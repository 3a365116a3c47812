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
    ("topk"), BatchTopKSAE ("batchtopk"), JumpReluAutoEncoder ("jumprelu") or
    GatedAutoEncoder ("gated").

Our SAEs act on raw activations (the input scaling is folded in at the end of training), as do
SAELens SAEs with ``normalize_activations="none"`` and dictionary_learning checkpoints (whose
trainer calls ``scale_biases(norm_factor)`` before saving); so no scaling is exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from sae4scfm.errors import InputError
from sae4scfm.saes import build_sae, load_sae
from sae4scfm.saes.base import SAE
from sae4scfm.saes.batchtopk import BatchTopKSAE
from sae4scfm.saes.gated import GatedSAE
from sae4scfm.saes.jumprelu import JumpReLUSAE
from sae4scfm.saes.standard import StandardSAE
from sae4scfm.saes.topk import TopKSAE

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
SAELENS_VERSION = "6.0.0"  # the format written (SAELens ≥ 6 loads it)
DICTIONARY_LEARNING_ARCHITECTURES = ("standard", "topk", "batchtopk", "matryoshka", "jumprelu", "gated")


def _base_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    return {k: getattr(sae, k).detach().float().contiguous().cpu() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}


def export_saelens(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the SAE of ``run_dir`` in SAELens' format into ``out_dir``; returns ``out_dir``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "sae.safetensors").is_file() or not (run_dir / "cfg.json").is_file():
        raise InputError(f"{run_dir} is not a run dir (sae.safetensors and cfg.json are needed); "
                         "pass the folder that `train` wrote.")
    sae, meta = load_sae(run_dir)
    arch = meta["architecture"]
    saelens_arch = _saelens_architecture(sae)
    if saelens_arch is None:
        raise InputError(f"architecture {arch!r} of {run_dir}/cfg.json cannot be exported to SAELens (its "
                         "inference has no SAELens counterpart); exportable: standard, p_anneal, topk, jumprelu, "
                         "batchtopk, matryoshka, gated, gated_anneal.")
    tensors = _base_tensors(sae)
    cfg: dict = {}
    if saelens_arch == "topk":
        cfg.update(k=int(sae.k), rescale_acts_by_decoder_norm=False)
    elif saelens_arch == "gated":
        tensors["b_gate"] = tensors.pop("b_enc")
        tensors.update({k: getattr(sae, k).detach().float().contiguous().cpu() for k in ("b_mag", "r_mag")})
    elif isinstance(sae, JumpReLUSAE):
        tensors["threshold"] = sae.threshold.detach().float().contiguous().cpu()
    elif isinstance(sae, BatchTopKSAE):  # BatchTopK family: f = ReLU(z)·1[ReLU(z) > θ] == ReLU(z)·1[z > max(θ, 0)], SAELens' JumpReLU
        tensors["threshold"] = sae.threshold.detach().float().clamp(min=0).expand(sae.d_sae).contiguous().cpu()
    metadata = {
        "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
        "model_name": meta.get("model_family"),
        "hook_name": meta.get("hook_point"), "hook_layer": meta.get("layer"),
        "dataset_path": (meta.get("dataset") or {}).get("path") if isinstance(meta.get("dataset"), dict) else None,
        "sae4scfm": {"architecture": arch, "hyperparams": meta.get("hyperparams", {}),
                     "input_scaling": meta.get("input_scaling"), "run_dir": str(run_dir)},
    }
    cfg = {"architecture": saelens_arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", **cfg,
           "metadata": {k: v for k, v in metadata.items() if v is not None}}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / SAELENS_WEIGHTS)
    (out_dir / SAELENS_CFG).write_text(json.dumps(cfg, indent=1, default=str))
    return out_dir


def _saelens_architecture(sae: SAE) -> str | None:
    """The SAELens architecture with the same inference as ``sae``, or None. Subclasses count only
    while they keep their base's encode/decode (e.g. p_anneal = standard, matryoshka = batchtopk)."""
    same = type(sae).decode is SAE.decode and type(sae).pre_acts is SAE.pre_acts
    for cls, name in ((StandardSAE, "standard"), (TopKSAE, "topk"), (JumpReLUSAE, "jumprelu"),
                      (BatchTopKSAE, "jumprelu"), (GatedSAE, "gated")):
        if isinstance(sae, cls):
            return name if same and type(sae).encode is cls.encode else None
    return None


def _fold_b_dec_into_b_enc(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """A reference that does not subtract b_dec before encoding: x W + b  ==  (x − b_dec) W + (b + b_dec W)."""
    return b_enc + b_dec @ W_enc


def _build(architecture: str, tensors: Mapping[str, torch.Tensor], hyperparams: dict,
           extra: Mapping[str, torch.Tensor] | None = None) -> SAE:
    d_in, d_sae = tensors["W_enc"].shape
    sae = build_sae(architecture, int(d_in), int(d_sae), hyperparams)
    state = {k: v.detach().float().clone() for k, v in tensors.items()}
    state.update({k: v.detach().float().clone() for k, v in (extra or {}).items()})
    sae.load_state_dict(state)
    return sae.eval()


def import_saelens(path: str | Path, norm_scaling_factor: float | None = None) -> SAE:
    """Our SAE from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    ``normalize_activations="expected_average_only_in"`` SAEs act on ``s · x``; pass that
    ``norm_scaling_factor`` s to fold it into the weights (``SAE.fold_input_scale``)."""
    path = Path(path)
    for name in (SAELENS_CFG, SAELENS_WEIGHTS):
        if not (path / name).is_file():
            raise InputError(f"{path / name} is missing; point import_saelens at a folder written by "
                             "SAELens' save_model (cfg.json + sae_weights.safetensors).")
    cfg = json.loads((path / SAELENS_CFG).read_text())
    w = load_file(path / SAELENS_WEIGHTS)
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
    W_enc, W_dec, b_dec = (w[k].float() for k in ("W_enc", "W_dec", "b_dec"))
    b_enc = w["b_enc"].float() if "b_enc" in w else None
    if not cfg.get("apply_b_dec_to_input", True) and arch != "gated":
        b_enc = _fold_b_dec_into_b_enc(W_enc, b_enc, b_dec)
    extra: dict[str, torch.Tensor] = {}
    if arch == "standard":
        norms = W_dec.norm(dim=1)
        hp = {"decoder_norm_l1": not torch.allclose(norms, torch.ones_like(norms), atol=1e-4)}
    elif arch == "topk":
        hp = {"k": int(cfg["k"])}
        if cfg.get("rescale_acts_by_decoder_norm", False):  # z·‖W_dec,i‖ then TopK: fold the norms in
            n = W_dec.norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    elif arch == "jumprelu":
        # SAELens: ReLU(z)·1[z > θ]; ours z·1[z > θ] with θ > 0; θ ≤ 0 acts as θ = 0
        hp = {}
        extra["log_threshold"] = w["threshold"].float().clamp(min=0).log()
    elif arch == "gated":
        b_enc, b_mag, r_mag = w["b_gate"].float(), w["b_mag"].float(), w["r_mag"].float()
        if not cfg.get("apply_b_dec_to_input", True):  # both paths share z = x W: fold b_dec into each bias
            shift = b_dec @ W_enc
            b_enc, b_mag = b_enc + shift, b_mag + r_mag.exp() * shift
        norms = W_dec.norm(dim=1)
        hp = {"unit_norm_decoder": bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-4))}
        extra = {"r_mag": r_mag, "b_mag": b_mag}
    else:
        raise InputError(f"{path / SAELENS_CFG}: SAELens architecture {arch!r} has no sae4scfm counterpart; "
                         "importable: standard, topk, jumprelu, gated.")
    sae = _build(arch, {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, hp, extra)
    if norm == "expected_average_only_in":
        sae.fold_input_scale(float(norm_scaling_factor))
    return sae


def import_dictionary_learning(path_or_state_dict: str | Path | Mapping[str, torch.Tensor], architecture: str,
                               apply_b_dec_to_input: bool = False) -> SAE:
    """Our SAE from a dictionary_learning (0.1.0) checkpoint: a path to ``ae.pt`` or its state dict.

    ``architecture``: "standard" (AutoEncoder), "topk" (AutoEncoderTopK), "batchtopk"
    (BatchTopKSAE), "matryoshka" (MatryoshkaBatchTopKSAE), "jumprelu" (JumpReluAutoEncoder) or
    "gated" (GatedAutoEncoder). ``apply_b_dec_to_input`` is the
    JumpReluAutoEncoder attribute of that name (not saved in its state dict; False unless the
    SAE came from SAELens)."""
    if isinstance(path_or_state_dict, (str, Path)):
        p = Path(path_or_state_dict)
        if not p.is_file():
            raise InputError(f"{p} does not exist; pass a dictionary_learning ae.pt or its state dict.")
        sd = torch.load(p, map_location="cpu", weights_only=True)
    else:
        sd = dict(path_or_state_dict)
    if architecture not in DICTIONARY_LEARNING_ARCHITECTURES:
        raise InputError(f"architecture={architecture!r} is unknown; importable: "
                         + ", ".join(DICTIONARY_LEARNING_ARCHITECTURES) + ".")
    try:
        if architecture == "jumprelu":
            W_enc, W_dec, b_enc, b_dec = (sd[k].float() for k in ("W_enc", "W_dec", "b_enc", "b_dec"))
            if not apply_b_dec_to_input:
                b_enc = _fold_b_dec_into_b_enc(W_enc, b_enc, b_dec)
            # theirs: ReLU(z·1[z > θ]); ours z·1[z > θ] with θ > 0; θ ≤ 0 acts as θ = 0
            extra = {"log_threshold": sd["threshold"].float().clamp(min=0).log()}
            return _build("jumprelu", {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, {}, extra)
        if architecture == "matryoshka":  # W_enc [d_in, d_sae] as ours; groups as sizes
            tensors = {k: sd[k].float() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
            d_sae = tensors["W_dec"].shape[0]
            hp = {"k": int(sd["k"]), "group_fractions": [int(n) / d_sae for n in sd["group_sizes"].tolist()]}
            return _build("matryoshka", tensors, hp, {"threshold": sd["threshold"].float().reshape(())})
        if architecture == "gated":  # GatedAutoEncoder: encoder(x − decoder_bias), as ours
            tensors = {"W_enc": sd["encoder.weight"].float().t(), "W_dec": sd["decoder.weight"].float().t(),
                       "b_enc": sd["gate_bias"].float(), "b_dec": sd["decoder_bias"].float()}
            norms = tensors["W_dec"].norm(dim=1)
            hp = {"unit_norm_decoder": bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-4))}
            return _build("gated", tensors, hp, {"r_mag": sd["r_mag"].float(), "b_mag": sd["mag_bias"].float()})
        # nn.Linear weights: encoder.weight [d_sae, d_in], decoder.weight [d_in, d_sae]
        W_enc = sd["encoder.weight"].float().t()
        W_dec = sd["decoder.weight"].float().t()
        b_enc = sd["encoder.bias"].float()
        b_dec = (sd["bias"] if architecture == "standard" else sd["b_dec"]).float()
    except KeyError as e:
        raise InputError(f"the state dict has no {e.args[0]!r}: it is not a dictionary_learning "
                         f"{architecture!r} checkpoint (keys: {', '.join(sorted(sd))}).") from None
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    if architecture == "standard":
        norms = W_dec.norm(dim=1)
        return _build("standard", tensors, {"decoder_norm_l1": not torch.allclose(norms, torch.ones_like(norms),
                                                                                   atol=1e-4)})
    k = int(sd["k"]) if "k" in sd else None
    if k is None:
        raise InputError(f"the {architecture!r} state dict has no 'k' buffer; it is not a dictionary_learning "
                         "AutoEncoderTopK / BatchTopKSAE checkpoint.")
    if architecture == "topk":  # inference is per-token TopK (their threshold is only used on request)
        return _build("topk", tensors, {"k": k})
    # BatchTopKSAE: ReLU(z)·1[ReLU(z) > θ], the same rule and buffer as ours
    return _build("batchtopk", tensors, {"k": k}, {"threshold": sd["threshold"].float().reshape(())})

