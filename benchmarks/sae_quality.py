"""SAE quality at matched L0 and token budget: ours vs dictionary_learning 0.1.0 vs SAELens 6.x.

For every architecture, each library that implements it trains an SAE on the SAME batches (same
token budget, same order) and is scored on the same held-out tokens: FVU, L0 (mean active latents
per token at inference), dead fraction (latents that never fire on the held-out tokens) and, on
synthetic data, ground-truth recovery (mean over true directions of the max cosine similarity to a
decoder row). Two datasets:

  synthetic  x = offset + sum of k_true of n_true unit directions (benchmarks/sae_training.py)
  demo       residual stream of the demo model at layer 2 (the package's cached activation store)

Matched L0:
  topk                 the same k.
  batchtopk/matryoshka the same k in training. Inference is per-sample with a global threshold θ, so
                       the inference L0 depends on θ. Two rows per reference: "own θ" (the library's
                       training EMA, as it ships) and "θ calibrated" (the same estimator for every
                       library: the mean over the first 64 training batches of the smallest
                       activation BatchTopK keeps, at the final weights). Ours calibrates by default;
                       its "EMA θ" row is the training EMA before that.
  penalised            the sparsity coefficient c is searched per library (log-log secant steps on
                       L0(c), ``--max-runs`` runs at most) until the held-out L0 is within ``--tol``
                       of the target. The run closest to the target is reported, and "FVU@L0"
                       interpolates FVU to exactly the target L0 (log-log, between the nearest runs
                       on either side; "–" when the runs do not bracket it).
  jumprelu             the threshold is learned as log θ, and Adam moves log θ by about lr per step:
                       ~0.3 in 300 steps. At this budget L0 is set by the initial threshold θ0, not
                       by the L0 coefficient (ours: the same L0 for l0_coeff 1e-3 .. 0.1), so θ0 is
                       searched (ours and SAELens; l0 coefficient at its default).
                       dictionary_learning's JumpReLU has the target L0 in its loss and θ0 fixed
                       at 0.001: one run.

What is shared (``--lr matched``, the default): the learning rate (ours, from config/sae/<arch>.yaml:
2e-4 / sqrt(d_sae / 2^14), Gao et al.), 5% linear lr warmup then constant, 5% linear
sparsity-coefficient warmup, the dead-latent window (train.dead_after_tokens), the batches.
What stays each library's own: initialisation, b_dec init, input normalisation (ours scales the
centred activations to unit variance per dimension; the references use none, their default), loss,
Adam betas, gradient clipping, decoder-norm policy, dead-latent handling, thresholds.
``--lr default`` gives the references their own default learning rates instead (dictionary_learning:
standard 1e-3, gated 5e-5, jumprelu 7e-5, p_anneal 1e-3, TopK family the same scaling law; SAELens
3e-4).

Architectures (ours | dictionary_learning | SAELens):
  standard       ReLU + L1, unit-norm decoder | StandardTrainer | –
  standard_dnl1  ReLU + Σ fᵢ‖W_dec,i‖, free decoder norms | StandardTrainerAprilUpdate | StandardTrainingSAE
  topk, batchtopk, matryoshka                 | TopK/BatchTopK/MatryoshkaBatchTopKTrainer | *TrainingSAE
  gated          unit-norm decoder | GatedSAETrainer | –
  gated_free     free decoder norms (unit_norm_decoder=false) | – | GatedTrainingSAE
  jumprelu       L0 penalty | JumpReluTrainer (target-L0 loss) | JumpReLUTrainingSAE (step L0 loss)
  p_anneal, gated_anneal | PAnnealTrainer, GatedAnnealTrainer (p_end 0.2 as ours: their default 0
                 divides by zero at this budget; anneal_start = 10% of the steps as ours) | –

    python benchmarks/sae_quality.py [--steps 300] [--batch 1024] [--datasets synthetic,demo]
        [--archs topk,standard,...] [--libraries sae4scfm,dictionary_learning,SAELens] [--lr matched]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_training import _dictionary_learning_trainers, synthetic_activations  # noqa: E402

from sae4scfm.saes import build_sae  # noqa: E402
from sae4scfm.training.schedules import base_lr, geometric_median, input_scale
from sae4scfm.training.trainer import Member, train_step

CONFIG = Path(__file__).resolve().parents[1] / "sae4scfm" / "config"
TRAIN = OmegaConf.load(CONFIG / "train.yaml").train
CALIBRATION_BATCHES = int(TRAIN.calibration_batches)
ARCHS = ("standard", "standard_dnl1", "topk", "batchtopk", "matryoshka", "gated", "gated_free", "jumprelu",
         "p_anneal", "gated_anneal")
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
THRESHOLDED = ("batchtopk", "matryoshka")
# benchmark name -> (our architecture, hyperparameter overrides)
OURS = {"standard_dnl1": ("standard", {"decoder_norm_l1": True}),
        "gated_free": ("gated", {"unit_norm_decoder": False})}
DL_ARCHS = ("standard", "standard_dnl1", "topk", "batchtopk", "matryoshka", "gated", "jumprelu", "p_anneal",
            "gated_anneal")
SL_ARCHS = ("standard_dnl1", "topk", "batchtopk", "matryoshka", "gated_free", "jumprelu")
# first value of each search, from earlier runs of this script at the default settings (the search
# still runs; with other settings they are just starting points): (library, arch, dataset) -> value.
# Missing: the library's default.
START = {
    ("sae4scfm", "standard", "synthetic"): 5.8, ("dictionary_learning", "standard", "synthetic"): 2.6,
    ("sae4scfm", "standard_dnl1", "synthetic"): 5.9, ("dictionary_learning", "standard_dnl1", "synthetic"): 30.0,
    ("SAELens", "standard_dnl1", "synthetic"): 30.0, ("sae4scfm", "gated", "synthetic"): 10.5,
    ("dictionary_learning", "gated", "synthetic"): 10.5, ("sae4scfm", "gated_free", "synthetic"): 7.1,
    ("SAELens", "gated_free", "synthetic"): 17.0, ("sae4scfm", "jumprelu", "synthetic"): 1.37,
    ("SAELens", "jumprelu", "synthetic"): 0.5, ("sae4scfm", "p_anneal", "synthetic"): 9.2,
    ("dictionary_learning", "p_anneal", "synthetic"): 0.69, ("sae4scfm", "gated_anneal", "synthetic"): 12.4,
    ("dictionary_learning", "gated_anneal", "synthetic"): 10.0,
    ("sae4scfm", "standard", "demo"): 2.55, ("dictionary_learning", "standard", "demo"): 3.0,
    ("sae4scfm", "standard_dnl1", "demo"): 3.45, ("dictionary_learning", "standard_dnl1", "demo"): 2.9,
    ("SAELens", "standard_dnl1", "demo"): 2.8, ("sae4scfm", "gated", "demo"): 5.3,
    ("dictionary_learning", "gated", "demo"): 6.7, ("sae4scfm", "gated_free", "demo"): 3.26,
    ("SAELens", "gated_free", "demo"): 3.55, ("sae4scfm", "jumprelu", "demo"): 1.27,
    ("SAELens", "jumprelu", "demo"): 0.38, ("sae4scfm", "p_anneal", "demo"): 2.95,
    ("dictionary_learning", "p_anneal", "demo"): 1.52, ("sae4scfm", "gated_anneal", "demo"): 5.6,
    ("dictionary_learning", "gated_anneal", "demo"): 4.7,
}


@dataclass
class Data:
    name: str
    batches: list[torch.Tensor]  # training batches, in order, shared by every library
    held_out: torch.Tensor
    target_l0: int  # k for TopK-family; the L0 target for penalised SAEs
    directions: torch.Tensor | None = None  # ground-truth directions [n_true, d_in] (synthetic)


@dataclass
class Trained:
    encode: Callable[[torch.Tensor], torch.Tensor]  # [N, d_in] -> [N, d_sae]
    decode: Callable[[torch.Tensor], torch.Tensor]  # [N, d_sae] -> [N, d_in]
    decoder_rows: Callable[[], torch.Tensor]  # () -> [d_sae, d_in]


@dataclass
class Budget:
    """What every library shares for one run."""

    lr_mode: str  # "matched": every library at our learning rate; "default": each its own
    warmup: int  # lr warmup steps
    sparsity_warmup: int  # sparsity-coefficient warmup steps
    dead_tokens: int  # dead-latent window in tokens


def our_hyperparams(arch: str) -> tuple[str, dict]:
    name, extra = OURS.get(arch, (arch, {}))
    hp = OmegaConf.to_container(OmegaConf.load(CONFIG / "sae" / f"{name}.yaml").hyperparams, resolve=True)
    return name, {**hp, **extra}


def our_lr(arch: str, d_sae: int) -> float:
    return base_lr(our_hyperparams(arch)[1], d_sae)


def threshold_variants(relu_pre: Callable, decode: Callable, rows: Callable, own: float, data: Data) -> dict:
    """{"own θ": Trained, "θ calibrated": Trained} for a BatchTopK-style SAE given its ReLU'd
    pre-activations ``relu_pre`` (x -> [N, d_sae]) and its own threshold; the calibrated θ is the
    mean over the first training batches of the smallest activation BatchTopK keeps."""
    k = data.target_l0
    with torch.no_grad():
        cutoffs = [relu_pre(x).flatten().topk(k * len(x)).values.min() for x in data.batches[:CALIBRATION_BATCHES]]
    calibrated = float(torch.stack(cutoffs).mean())

    def encoder(theta: float):
        def encode(x):
            a = relu_pre(x)
            return a * (a > theta)
        return encode

    return {"own θ": Trained(encoder(own), decode, rows), "θ calibrated": Trained(encoder(calibrated), decode, rows)}


# --------------------------------------------------------------------------- ours
def train_ours(arch: str, data: Data, d_sae: int, coeff: float | None, budget: Budget) -> dict[str, Trained]:
    name, hp = our_hyperparams(arch)
    if arch in TOPK_FAMILY:
        hp["k"] = data.target_l0
    elif arch == "jumprelu":
        hp["init_threshold"] = coeff  # the knob that sets L0 at this budget (see the module docstring)
    else:
        hp["l1_coeff"] = coeff
    train_cfg = OmegaConf.create(OmegaConf.to_container(TRAIN))
    train_cfg.log_every = train_cfg.checkpoint_every = 10**9  # still one checkpoint at the last step (temp dir)
    cfg = OmegaConf.create({"train": OmegaConf.to_container(train_cfg), "sae": {"hyperparams": hp}})
    d_in = data.held_out.shape[1]
    sample = torch.cat(data.batches)[:8192]
    scale = input_scale(sample)
    torch.manual_seed(0)
    sae = build_sae(name, d_in, d_sae, hp)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
    opt = torch.optim.Adam(sae.parameters(), lr=base_lr(hp, sae.d_sae), betas=(0.9, 0.999), fused=True)
    total = len(data.batches)
    with tempfile.TemporaryDirectory() as tmp:
        m = Member(cfg, Path(tmp), sae, opt, torch.zeros(d_sae, dtype=torch.long), 0, scale, None)
        sae.train()
        for step, x in enumerate(data.batches, 1):
            train_step(m, x * scale, step, total, budget.warmup, 0)
    out = {}
    if arch in THRESHOLDED:
        ema = float(sae.threshold)
        sae.calibrate(x * scale for x in data.batches[:CALIBRATION_BATCHES])  # as sae4scfm.training.trainer._finish
    sae.fold_input_scale(scale)
    sae.eval()
    out["θ calibrated" if arch in THRESHOLDED else ""] = Trained(sae.encode, sae.decode, lambda: sae.W_dec)
    if arch in THRESHOLDED:
        def encode_ema(x):
            a = F.relu(sae.pre_acts(x))
            return a * (a > ema)
        out["EMA θ"] = Trained(encode_ema, sae.decode, lambda: sae.W_dec)
    return out


# --------------------------------------------------------------------------- dictionary_learning
def train_dictionary_learning(arch: str, data: Data, d_sae: int, coeff: float | None,
                              budget: Budget) -> dict[str, Trained]:
    _dictionary_learning_trainers()
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.gated_anneal import GatedAnnealTrainer
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.p_anneal import PAnnealTrainer
    from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerAprilUpdate
    from dictionary_learning.trainers.top_k import TopKTrainer

    steps, d_in = len(data.batches), data.held_out.shape[1]
    common = dict(steps=steps, activation_dim=d_in, dict_size=d_sae, layer=0, lm_name="bench", device="cpu", seed=0,
                  warmup_steps=budget.warmup)
    if budget.lr_mode == "matched":
        common["lr"] = our_lr(arch, d_sae)
    k = data.target_l0
    sparse = dict(sparsity_warmup_steps=budget.sparsity_warmup)
    anneal = dict(anneal_start=steps // 10, p_end=0.2, **sparse)
    if arch == "topk":
        trainer = TopKTrainer(k=k, threshold_start_step=budget.warmup, **common)
    elif arch == "batchtopk":
        trainer = BatchTopKTrainer(k=k, threshold_start_step=budget.warmup, **common)
    elif arch == "matryoshka":
        fractions = our_hyperparams("matryoshka")[1]["group_fractions"]
        trainer = MatryoshkaBatchTopKTrainer(k=k, group_fractions=list(fractions), threshold_start_step=budget.warmup,
                                             **common)
    elif arch == "standard":
        trainer = StandardTrainer(l1_penalty=coeff, **sparse, **common)
    elif arch == "standard_dnl1":
        trainer = StandardTrainerAprilUpdate(l1_penalty=coeff, **sparse, **common)
    elif arch == "gated":
        trainer = GatedSAETrainer(l1_penalty=coeff, **sparse, **common)
    elif arch == "jumprelu":
        trainer = JumpReluTrainer(target_l0=float(k), **sparse, **common)
    elif arch == "p_anneal":
        trainer = PAnnealTrainer(initial_sparsity_penalty=coeff, **anneal, **common)
    elif arch == "gated_anneal":
        trainer = GatedAnnealTrainer(initial_sparsity_penalty=coeff, **anneal, **common)
    else:
        raise ValueError(arch)
    if hasattr(trainer, "dead_feature_threshold"):
        trainer.dead_feature_threshold = budget.dead_tokens
    for step, x in enumerate(data.batches):
        trainer.update(step, x)
    ae = trainer.ae.eval()

    def rows():
        return ae.W_dec if hasattr(ae, "W_dec") else ae.decoder.weight.t()

    if arch in THRESHOLDED:
        def relu_pre(x):
            return ae.encode(x, return_active=True, use_threshold=False)[2]
        return threshold_variants(relu_pre, ae.decode, rows, float(ae.threshold), data)
    return {"": Trained(ae.encode, ae.decode, rows)}


# --------------------------------------------------------------------------- SAELens
def train_saelens(arch: str, data: Data, d_sae: int, coeff: float | None, budget: Budget) -> dict[str, Trained]:
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    d_in, k = data.held_out.shape[1], data.target_l0
    base = dict(d_in=d_in, d_sae=d_sae, device="cpu")
    torch.manual_seed(0)
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **base))
    elif arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, **base))
    elif arch == "matryoshka":
        fractions = our_hyperparams("matryoshka")[1]["group_fractions"]
        widths = [round(c * d_sae) for c in torch.tensor(list(fractions)).cumsum(0).tolist()]
        widths[-1] = d_sae
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(k=k, matryoshka_widths=widths, **base))
    elif arch == "standard_dnl1":
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(l1_coefficient=coeff, l1_warm_up_steps=budget.sparsity_warmup, **base))
    elif arch == "gated_free":
        sae = GatedTrainingSAE(GatedTrainingSAEConfig(l1_coefficient=coeff, l1_warm_up_steps=budget.sparsity_warmup,
                                                      **base))
    elif arch == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(jumprelu_init_threshold=coeff,
                                                            l0_warm_up_steps=budget.sparsity_warmup, **base))
    else:
        raise ValueError(arch)
    lr = our_lr(arch, d_sae) if budget.lr_mode == "matched" else 3e-4
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    dead_window = budget.dead_tokens // len(data.batches[0])
    since_fired = torch.zeros(d_sae)
    for step, x in enumerate(data.batches):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / budget.warmup)
        coefficients = {}
        for name, c in sae.get_coefficients().items():
            if isinstance(c, TrainCoefficientConfig):  # SAELens's linear coefficient warm-up
                c = c.value * (min(1.0, (step + 1) / c.warm_up_steps) if c.warm_up_steps else 1.0)
            coefficients[name] = c
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, since_fired > dead_window, step, False))
        with torch.no_grad():
            since_fired += 1
            since_fired[out.feature_acts.bool().any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    sae.eval()

    def rows():
        return sae.W_dec

    if arch in THRESHOLDED:  # as SAELens saves them for inference: JumpReLU at the learned threshold
        def relu_pre(x):
            return F.relu(sae.encode_with_hidden_pre(x)[1])
        return threshold_variants(relu_pre, sae.decode, rows, float(sae.topk_threshold), data)
    return {"": Trained(sae.encode, sae.decode, rows)}


LIBRARIES = {"sae4scfm": (train_ours, ARCHS), "dictionary_learning": (train_dictionary_learning, DL_ARCHS),
             "SAELens": (train_saelens, SL_ARCHS)}


def default_coeff(lib: str, arch: str) -> float | None:
    """Each library's default value of the searched knob (where the search starts without a START
    entry): the sparsity coefficient, or for JumpReLU the initial threshold."""
    if arch in TOPK_FAMILY or (lib == "dictionary_learning" and arch == "jumprelu"):
        return None
    if lib == "sae4scfm":
        return float(our_hyperparams(arch)[1]["init_threshold" if arch == "jumprelu" else "l1_coeff"])
    if lib == "dictionary_learning":
        return 0.1  # l1_penalty / initial_sparsity_penalty
    return 0.01 if arch == "jumprelu" else 1.0  # SAELens jumprelu_init_threshold / l1_coefficient


# --------------------------------------------------------------------------- scoring and search
@torch.no_grad()
def score(t: Trained, data: Data) -> dict:
    x = data.held_out
    f = t.encode(x)
    x_hat = t.decode(f)
    out = {"fvu": float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
           "l0": float((f > 0).float().sum(-1).mean()), "dead": float((f > 0).sum(0).eq(0).float().mean())}
    if data.directions is not None:
        cos = F.normalize(data.directions, dim=1) @ F.normalize(t.decoder_rows().detach().float(), dim=1).t()
        out["recovery"] = float(cos.max(1).values.mean())
    return out


def next_coeff(tried: list[tuple[float, dict]], target: float) -> float:
    """Next coefficient: log L0 is taken as linear in log c. Inside a bracket (one run denser,
    one sparser than the target) interpolate between its ends, kept off them; outside, extrapolate
    along the slope of the two nearest runs (slope -1 with one run), at most x10 per step."""
    pts = [(math.log(c), math.log(max(s["l0"], 0.05))) for c, s in tried]
    goal = math.log(target)
    dense = [p for p in pts if p[1] > goal]
    sparse = [p for p in pts if p[1] <= goal]
    if dense and sparse:
        (x0, y0), (x1, y1) = max(dense), min(sparse)
        t = (y0 - goal) / (y0 - y1) if y0 != y1 else 0.5
        return math.exp(x0 + min(0.8, max(0.2, t)) * (x1 - x0))
    near = sorted(pts, key=lambda p: abs(p[1] - goal))[:2]
    slope = -1.0
    if len(near) == 2 and near[0][0] != near[1][0]:
        slope = (near[0][1] - near[1][1]) / (near[0][0] - near[1][0])
        slope = min(-0.2, slope)  # L0 falls with c; flat or rising slopes are noise
    x, y = near[0]
    step = max(-math.log(10), min(math.log(10), (goal - y) / slope))
    return math.exp(x + step)


def fvu_at_target(tried: list[tuple[float, dict]], target: float) -> float | None:
    """FVU at exactly the target L0, interpolated log-log between the runs nearest the target on
    either side (both within a factor 2 of it); None without such a bracket."""
    dense = [s for _, s in tried if target < s["l0"] <= 2 * target]
    sparse = [s for _, s in tried if target / 2 <= s["l0"] <= target]
    if not dense or not sparse:
        return None
    a, b = min(dense, key=lambda s: s["l0"]), max(sparse, key=lambda s: s["l0"])
    if a["l0"] == b["l0"]:
        return b["fvu"]
    t = math.log(target / a["l0"]) / math.log(b["l0"] / a["l0"])
    return math.exp(math.log(a["fvu"]) + t * (math.log(b["fvu"]) - math.log(a["fvu"])))


@dataclass
class Row:
    dataset: str
    arch: str
    library: str
    setting: str  # k / coefficient / threshold variant
    runs: int
    scores: dict
    fvu_at_target: float | None = None


def matched(lib: str, arch: str, data: Data, d_sae: int, budget: Budget, max_runs: int, tol: float) -> list[Row]:
    """Rows for one (library, architecture): one run for the TopK family (a row per threshold
    variant) and dictionary_learning's JumpReLU, else a coefficient search (``next_coeff``) that
    stops within ``tol`` (relative) of the target L0 or after ``max_runs`` runs."""
    train = LIBRARIES[lib][0]
    target = data.target_l0
    c = START.get((lib, arch, data.name), default_coeff(lib, arch))
    if c is None:
        label = f"target_l0={target}" if arch == "jumprelu" else f"k={target}"
        return [Row(data.name, arch, lib, f"{label}{', ' + v if v else ''}", 1, score(t, data))
                for v, t in train(arch, data, d_sae, None, budget).items()]
    tried = []  # (coefficient, scores)
    for _ in range(max_runs):
        s = score(train(arch, data, d_sae, c, budget)[""], data)
        tried.append((c, s))
        if abs(s["l0"] / target - 1) <= tol:
            break
        c = next_coeff(tried, target)
    knob = "θ0" if arch == "jumprelu" else "c"
    path = ", ".join(f"{knob} {c:.3g} -> L0 {s['l0']:.1f} FVU {s['fvu']:.3f}" for c, s in tried)
    print(f"    search: {path}", flush=True)
    c, s = min(tried, key=lambda cs: abs(math.log(max(cs[1]["l0"], 1e-3) / target)))
    return [Row(data.name, arch, lib, f"{knob}={c:.3g}", len(tried), s, fvu_at_target(tried, target))]


# --------------------------------------------------------------------------- datasets
def synthetic(args) -> Data:
    n_train = args.steps * args.batch
    x = synthetic_activations(n_train + args.held_out, args.d_in, args.n_true, args.k_true, seed=0)
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(args.n_true, args.d_in, generator=g)  # the same draw as synthetic_activations
    directions /= directions.norm(dim=1, keepdim=True)
    return Data("synthetic", list(x[:n_train].split(args.batch)), x[n_train:], args.k, directions)


def demo(args) -> Data:
    import sae4scfm
    from sae4scfm.scfm.loading import load_model_and_data
    from sae4scfm.store.extract import activation_stores

    cfg = sae4scfm.compose("train", ["wandb.mode=disabled", "device=cpu"])
    adapter, adata, tokens = load_model_and_data(cfg, "cpu")
    stores = activation_stores(cfg, adapter, adata, tokens, [2])
    train = torch.cat([s["acts"].float() for s in stores["train"][2].iter_shards()])
    held_out = torch.cat([s["acts"].float() for s in stores["eval"][2].iter_shards()])
    g = torch.Generator().manual_seed(0)
    n_epochs = math.ceil(args.steps * args.batch / len(train))
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(n_epochs)])[:args.steps * args.batch]
    print(f"demo: {len(train):,} train tokens ({args.steps * args.batch / len(train):.1f} epochs), "
          f"{len(held_out):,} held-out, d_in {train.shape[1]}", flush=True)
    return Data("demo", list(train[order].split(args.batch)), held_out, args.demo_k)


def table(rows: list[Row]) -> str:
    lines = ["| dataset | arch | library | setting | runs | L0 | FVU | FVU@L0 | dead | recovery |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = r.scores
        at = f"{r.fvu_at_target:.4f}" if r.fvu_at_target is not None else "–"
        rec = f"{s['recovery']:.3f}" if "recovery" in s else "–"
        lines.append(f"| {r.dataset} | {r.arch} | {r.library} | {r.setting} | {r.runs} | {s['l0']:.2f} | "
                     f"{s['fvu']:.4f} | {at} | {s['dead']:.1%} | {rec} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="synthetic,demo")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {', '.join(ARCHS)}")
    p.add_argument("--libraries", default="sae4scfm,dictionary_learning,SAELens")
    p.add_argument("--lr", choices=("matched", "default"), default="matched",
                   help="matched: every library at our learning rate; default: the references at their own")
    p.add_argument("--steps", type=int, default=300, help="training steps (same batches for every library)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--d-in", type=int, default=64, help="synthetic d_in (demo: the model's d_model)")
    p.add_argument("--d-sae", type=int, default=512, help="synthetic d_sae")
    p.add_argument("--n-true", type=int, default=256, help="synthetic ground-truth directions")
    p.add_argument("--k-true", type=int, default=4, help="synthetic active directions per token")
    p.add_argument("--k", type=int, default=8, help="synthetic k / L0 target")
    p.add_argument("--demo-multiplier", type=int, default=4, help="demo d_sae = multiplier x d_model")
    p.add_argument("--demo-k", type=int, default=16, help="demo k / L0 target")
    p.add_argument("--held-out", type=int, default=16384, help="synthetic held-out tokens")
    p.add_argument("--max-runs", type=int, default=5, help="runs per coefficient search")
    p.add_argument("--tol", type=float, default=0.1, help="search stops at |L0/target - 1| <= tol")
    args = p.parse_args()
    unknown = set(args.archs.split(",")) - set(ARCHS)
    if unknown:
        p.error(f"--archs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ARCHS)}")
    budget = Budget(args.lr, warmup=max(1, int(float(TRAIN.lr_warmup_frac) * args.steps)),
                    sparsity_warmup=max(1, int(float(TRAIN.sparsity_warmup_frac) * args.steps)),
                    dead_tokens=int(TRAIN.dead_after_tokens))
    start = time.perf_counter()
    rows: list[Row] = []
    for name in args.datasets.split(","):
        data = synthetic(args) if name == "synthetic" else demo(args)
        d_sae = args.d_sae if name == "synthetic" else args.demo_multiplier * data.held_out.shape[1]
        for arch in args.archs.split(","):
            for lib in args.libraries.split(","):
                if arch not in LIBRARIES[lib][1]:
                    continue
                t0 = time.perf_counter()
                for r in matched(lib, arch, data, d_sae, budget, args.max_runs, args.tol):
                    rows.append(r)
                    s = r.scores
                    print(f"  {name} {arch} {lib} {r.setting}: L0 {s['l0']:.2f} FVU {s['fvu']:.4f}"
                          + (f" (@L0 {r.fvu_at_target:.4f})" if r.fvu_at_target is not None else "")
                          + f" dead {s['dead']:.3f}" + (f" rec {s['recovery']:.3f}" if "recovery" in s else "")
                          + f"  ({r.runs} run{'s' * (r.runs > 1)}, {time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"\n{args.steps} steps x {args.batch} tokens per SAE, lr {args.lr}; synthetic d_in {args.d_in}, "
          f"d_sae {args.d_sae}, {args.k_true} of {args.n_true} true directions per token; "
          f"total {time.perf_counter() - start:.0f}s\n")
    print(table(rows))


if __name__ == "__main__":
    main()
