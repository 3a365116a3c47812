"""SAE quality at matched L0 and token budget: ours vs dictionary_learning 0.1.0 vs SAELens 6.x.

For every architecture a reference implements, each library trains an SAE on the SAME batches
(same token budget, same order) and is scored on the same held-out tokens: FVU, L0 (mean active
latents per token), dead fraction (latents that never fire on the held-out tokens) and, on
synthetic data, ground-truth recovery (mean over true directions of the max cosine similarity to
a decoder row). Two datasets:

  synthetic  x = offset + sum of k_true of n_true unit directions (benchmarks/sae_training.py)
  demo       residual stream of the demo model at layer 2 (the package's cached activation store)

Matched L0: TopK-family SAEs use the same k. For penalised architectures (standard, gated,
jumprelu, p_anneal, gated_anneal) each library's sparsity coefficient is searched (geometric
bracketing then bisection, a few short runs) so the held-out L0 lands near the target; the run
closest to the target is reported, with the L0 it reached beside its FVU.

How each library is used:
  ours                 the shared training loop of sae4scfm.training (``_step``: loss, backward,
                       remove_parallel_decoder_grad, clip, Adam, normalize_decoder, after_step),
                       lr / warmup / decay / dead window from config/train.yaml and
                       config/sae/<arch>.yaml; inputs scaled by sqrt(d_in / E||x||^2), b_dec at
                       their geometric median, the scale folded into the weights before scoring.
  dictionary_learning  each trainer's own ``update`` with its defaults (lr, Adam betas, bias
                       init, resampling, no activation normalisation: trainSAE's default).
                       Changed because the budget is short: warmup_steps 1000 -> steps/20,
                       sparsity_warmup_steps 2000 -> steps/10, threshold_start_step 1000 ->
                       steps/20, anneal_start 15000 -> steps/10 (ours: 0.1), and the AuxK dead
                       window 10M tokens -> ours (train.dead_after_tokens); p_anneal and gated_anneal
                       p_end 0 -> 0.2 (ours: their p_end=0 divides by zero at this budget). jumprelu has a
                       target_l0 in its loss: it is set to the target and not searched.
  SAELens              the training SAEs' ``training_forward_pass`` with SAELens's trainer step
                       (Adam 3e-4 constant, betas 0.9/0.999, clip 1.0, no activation
                       normalisation: its defaults). Changed: dead_feature_window 1000 steps ->
                       ours (in steps) so AuxK can act within the budget. BatchTopK/Matryoshka
                       are scored with their learned threshold (as SAELens saves them: JumpReLU).

    python benchmarks/sae_quality.py [--steps 300] [--batch 1024] [--datasets synthetic,demo]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_training import _dictionary_learning_trainers, synthetic_activations  # noqa: E402

from sae4scfm.saes import build_sae  # noqa: E402
from sae4scfm.training import Member, _step, base_lr, geometric_median  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "sae4scfm" / "config"
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")

# (library, architecture) -> name of the coefficient searched, or None for k / fixed target.
DL_ARCHS = ("standard", "topk", "batchtopk", "matryoshka", "gated", "jumprelu", "p_anneal", "gated_anneal")
SL_ARCHS = ("standard", "topk", "batchtopk", "matryoshka", "gated", "jumprelu")


@dataclass
class Data:
    name: str
    batches: list[torch.Tensor]  # training batches, in order, shared by every library
    held_out: torch.Tensor
    target_l0: int  # k for TopK-family; the L0 target for penalised SAEs
    directions: torch.Tensor | None = None  # ground-truth directions [n_true, d_in] (synthetic)


@dataclass
class Trained:
    encode: callable
    decode: callable
    decoder_rows: callable  # () -> [d_sae, d_in]


class _NoLog:
    def log(self, row):
        pass


# --------------------------------------------------------------------------- ours
def train_ours(arch: str, data: Data, d_sae: int, coeff: float | None) -> Trained:
    train_cfg = OmegaConf.load(CONFIG / "train.yaml").train
    hp = OmegaConf.to_container(OmegaConf.load(CONFIG / "sae" / f"{arch}.yaml").hyperparams, resolve=True)
    if arch in TOPK_FAMILY:
        hp["k"] = data.target_l0
    elif arch == "jumprelu":
        hp["l0_coeff"] = coeff
    else:
        hp["l1_coeff"] = coeff
    train_cfg.log_every = 10**9
    train_cfg.checkpoint_every = 10**9  # still one checkpoint at the last step, into a temp dir
    cfg = OmegaConf.create({"train": OmegaConf.to_container(train_cfg), "sae": {"hyperparams": hp}})
    d_in = data.held_out.shape[1]
    sample = torch.cat(data.batches)[:8192]
    scale = float((d_in / sample.pow(2).sum(1).mean()).sqrt())
    torch.manual_seed(0)
    sae = build_sae(arch, d_in, d_sae, hp)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample * scale))
    opt = torch.optim.Adam(sae.parameters(), lr=base_lr(hp, sae.d_sae), betas=(0.9, 0.999), fused=True)
    total = len(data.batches)
    warmup = max(1, int(float(train_cfg.lr_warmup_frac) * total))
    with tempfile.TemporaryDirectory() as tmp:
        m = Member(cfg, Path(tmp), sae, opt, torch.zeros(d_sae, dtype=torch.long), 0, scale, _NoLog())
        sae.train()
        for step, x in enumerate(data.batches, 1):
            _step(m, x * scale, step, total, warmup, 0)
    sae.fold_input_scale(scale)
    sae.eval()
    return Trained(sae.encode, sae.decode, lambda: sae.W_dec)


# --------------------------------------------------------------------------- dictionary_learning
def train_dictionary_learning(arch: str, data: Data, d_sae: int, coeff: float | None) -> Trained:
    _dictionary_learning_trainers()
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.gated_anneal import GatedAnnealTrainer
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.p_anneal import PAnnealTrainer
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    steps, d_in = len(data.batches), data.held_out.shape[1]
    warm, sparse_warm = max(1, steps // 20), max(1, steps // 10)
    common = dict(steps=steps, activation_dim=d_in, dict_size=d_sae, layer=0, lm_name="bench", device="cpu", seed=0)
    k = data.target_l0
    if arch == "topk":
        trainer = TopKTrainer(k=k, warmup_steps=warm, threshold_start_step=warm, **common)
    elif arch == "batchtopk":
        trainer = BatchTopKTrainer(k=k, warmup_steps=warm, threshold_start_step=warm, **common)
    elif arch == "matryoshka":
        fractions = OmegaConf.load(CONFIG / "sae" / "matryoshka.yaml").hyperparams.group_fractions
        trainer = MatryoshkaBatchTopKTrainer(k=k, group_fractions=list(fractions), warmup_steps=warm,
                                             threshold_start_step=warm, **common)
    elif arch == "standard":
        trainer = StandardTrainer(l1_penalty=coeff, warmup_steps=warm, sparsity_warmup_steps=sparse_warm, **common)
    elif arch == "gated":
        trainer = GatedSAETrainer(l1_penalty=coeff, warmup_steps=warm, sparsity_warmup_steps=sparse_warm, **common)
    elif arch == "jumprelu":
        trainer = JumpReluTrainer(target_l0=coeff, warmup_steps=warm, sparsity_warmup_steps=sparse_warm, **common)
    elif arch == "p_anneal":
        trainer = PAnnealTrainer(initial_sparsity_penalty=coeff, warmup_steps=warm,
                                 sparsity_warmup_steps=sparse_warm, anneal_start=steps // 10, p_end=0.2, **common)
    elif arch == "gated_anneal":
        trainer = GatedAnnealTrainer(initial_sparsity_penalty=coeff, warmup_steps=warm,
                                     sparsity_warmup_steps=sparse_warm, anneal_start=steps // 10, p_end=0.2, **common)
    else:
        raise ValueError(arch)
    if hasattr(trainer, "dead_feature_threshold"):
        trainer.dead_feature_threshold = int(OmegaConf.load(CONFIG / "train.yaml").train.dead_after_tokens)
    for step, x in enumerate(data.batches):
        trainer.update(step, x)
    ae = trainer.ae.eval()

    def rows():
        return ae.W_dec if hasattr(ae, "W_dec") else ae.decoder.weight.t()

    return Trained(ae.encode, ae.decode, rows)


# --------------------------------------------------------------------------- SAELens
def train_saelens(arch: str, data: Data, d_sae: int, coeff: float | None) -> Trained:
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                         MatryoshkaBatchTopKTrainingSAEConfig)
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
        fractions = OmegaConf.load(CONFIG / "sae" / "matryoshka.yaml").hyperparams.group_fractions
        widths = [round(c * d_sae) for c in torch.tensor(list(fractions)).cumsum(0).tolist()]
        widths[-1] = d_sae
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(k=k, matryoshka_widths=widths, **base))
    elif arch == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=coeff, **base))
    elif arch == "gated":
        sae = GatedTrainingSAE(GatedTrainingSAEConfig(l1_coefficient=coeff, **base))
    elif arch == "jumprelu":
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=coeff, **base))
    else:
        raise ValueError(arch)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    dead_window = int(OmegaConf.load(CONFIG / "train.yaml").train.dead_after_tokens) // len(data.batches[0])
    since_fired = torch.zeros(d_sae)
    for step, x in enumerate(data.batches):
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

    def encode(x):
        if arch in ("batchtopk", "matryoshka"):  # as saved for inference: JumpReLU at the learned threshold
            _, pre = sae.encode_with_hidden_pre(x)
            return F.relu(pre) * (pre > sae.topk_threshold)
        return sae.encode(x)

    return Trained(encode, sae.decode, lambda: sae.W_dec)


LIBRARIES = {"sae4scfm": (train_ours, None), "dictionary_learning": (train_dictionary_learning, DL_ARCHS),
             "SAELens": (train_saelens, SL_ARCHS)}


def default_coeff(lib: str, arch: str, target: int) -> float | None:
    """Each library's default sparsity coefficient (the search starts there)."""
    if arch in TOPK_FAMILY:
        return None
    if lib == "sae4scfm":
        hp = OmegaConf.load(CONFIG / "sae" / f"{arch}.yaml").hyperparams
        return float(hp["l0_coeff" if arch == "jumprelu" else "l1_coeff"])
    if lib == "dictionary_learning":
        return {"standard": 0.1, "gated": 0.1, "p_anneal": 0.1, "gated_anneal": 0.1, "jumprelu": float(target)}[arch]
    return 1.0  # SAELens l1_coefficient / l0_coefficient


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


def _next_coeff(tried: list[tuple[float, dict]], target: float) -> float:
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


def matched(lib: str, arch: str, data: Data, d_sae: int, max_runs: int, tol: float) -> tuple[float | None, dict, int]:
    """(coefficient, scores, runs): one run for TopK-family / fixed-target, else a search on the
    coefficient (L0 falls as it grows) in log-log space (``_next_coeff``); stops within ``tol``
    (relative) of the target or after ``max_runs`` runs, and returns the run closest to it."""
    train = LIBRARIES[lib][0]
    target = data.target_l0
    c = default_coeff(lib, arch, target)
    if c is None or (lib == "dictionary_learning" and arch == "jumprelu"):
        return c, score(train(arch, data, d_sae, c), data), 1
    tried = []  # (coefficient, scores)
    for _ in range(max_runs):
        s = score(train(arch, data, d_sae, c), data)
        tried.append((c, s))
        if abs(s["l0"] / target - 1) <= tol:
            break
        c = _next_coeff(tried, target)
    c, s = min(tried, key=lambda cs: abs(math.log(max(cs[1]["l0"], 1e-3) / target)))
    return c, s, len(tried)


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
    from sae4scfm.pipeline import activation_stores, load_model_and_data

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="synthetic,demo")
    p.add_argument("--archs", default="standard,topk,batchtopk,matryoshka,gated,jumprelu,p_anneal,gated_anneal")
    p.add_argument("--libraries", default="sae4scfm,dictionary_learning,SAELens")
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
    p.add_argument("--max-runs", type=int, default=4, help="runs per coefficient search")
    p.add_argument("--tol", type=float, default=0.2, help="search stops at |L0/target - 1| <= tol")
    args = p.parse_args()
    start = time.perf_counter()
    rows = []
    for name in args.datasets.split(","):
        data = synthetic(args) if name == "synthetic" else demo(args)
        d_sae = args.d_sae if name == "synthetic" else args.demo_multiplier * data.held_out.shape[1]
        for arch in args.archs.split(","):
            for lib in args.libraries.split(","):
                archs = LIBRARIES[lib][1]
                if archs is not None and arch not in archs:
                    continue
                t0 = time.perf_counter()
                c, s, runs = matched(lib, arch, data, d_sae, args.max_runs, args.tol)
                label = f"k={data.target_l0}" if c is None else \
                    (f"target_l0={c:g}" if lib == "dictionary_learning" and arch == "jumprelu" else f"{c:.3g}")
                rows.append((name, arch, lib, label, s))
                print(f"  {name} {arch} {lib}: {label} L0 {s['l0']:.1f} FVU {s['fvu']:.4f} dead {s['dead']:.3f}"
                      + (f" rec {s['recovery']:.3f}" if "recovery" in s else "")
                      + f"  ({runs} run{'s' * (runs > 1)}, {time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"\n{args.steps} steps x {args.batch} tokens per SAE; synthetic d_in {args.d_in}, d_sae {args.d_sae}, "
          f"{args.k_true} of {args.n_true} true directions per token; total {time.perf_counter() - start:.0f}s\n")
    print("| dataset | architecture | library | coeff/k | L0 | FVU | dead | recovery |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for name, arch, lib, label, s in rows:
        rec = f"{s['recovery']:.3f}" if "recovery" in s else "–"
        print(f"| {name} | {arch} | {lib} | {label} | {s['l0']:.1f} | {s['fvu']:.4f} | {s['dead']:.1%} | {rec} |")


if __name__ == "__main__":
    main()
