"""The SAE training loop every architecture shares, its checkpoints, and held-out evaluation.

Inputs are scaled by one factor ``s = sqrt(d_in / E‖x − x̄‖²)`` (``input_scale``) estimated
once from the training store; the saved weights have it folded in (``SAE.fold_input_scale``) so
they act on raw activations. ``b_dec`` starts at the geometric median of the scaled
data. Each step: loss → backward → drop the decoder-gradient component parallel to
each decoder row → clip the gradient norm → Adam → renormalise decoder rows (the
decoder-norm policy; architectures that learn decoder norms opt out). The sparsity
coefficient of penalised architectures warms up linearly from 0 over ``sparsity_warmup_frac``
of the steps (``SAE.sparsity_scale``). The learning rate warms up linearly, then stays
constant (or, with ``lr_decay_frac`` > 0, decays linearly to zero over that last fraction).
A latent is dead once it has not fired for ``dead_after_tokens`` training tokens (AuxK
revives those). After the last step ``SAE.calibrate`` sets inference statistics at the final
weights from ``calibration_batches`` training batches (BatchTopK's threshold).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sae4scfm import __version__
from sae4scfm.activations import ActivationStore
from sae4scfm.errors import InputError
from sae4scfm.pipeline import activation_stores, load_model_and_data, pick_device, split_tokens
from sae4scfm.runs import make_shareable, new_run_dir
from sae4scfm.saes import SAE, build_sae
from sae4scfm.scfm import ScFMAdapter
from sae4scfm.scfm.tokens import TokenizedCells

log = logging.getLogger(__name__)


@torch.no_grad()
def geometric_median(x: torch.Tensor, n_iter: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances. x [N, d] -> [d]."""
    median = x.mean(0)
    for _ in range(n_iter):
        w = 1.0 / (x - median).norm(dim=1).clamp(min=eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - median).norm() < eps * median.norm().clamp(min=1.0):
            return new
        median = new
    return median


def input_scale(sample: torch.Tensor) -> float:
    """s = sqrt(d_in / E‖x − x̄‖²) from a sample [N, d_in]: the scaled, centred activations have unit
    variance per dimension. Centred, so that training does not depend on a constant offset in the
    activations (``b_dec`` starts at their geometric median and absorbs it). Scaled by E‖x‖²
    instead, a large mean shrinks the signal, and the biases, which Adam moves by about lr per
    step whatever the data's scale, move fast relative to it (benchmarks/sae_quality.py,
    synthetic data with an offset: TopK FVU 0.267 with E‖x‖² scaling, 0.176 centred; demo
    activations: within 1%)."""
    sample = sample.double()
    return float((sample.shape[1] / (sample - sample.mean(0)).pow(2).sum(1).mean().clamp(min=1e-30)).sqrt())


def base_lr(hyperparams, d_sae: int) -> float:
    """``hyperparams.lr``, or for ``lr: null`` the scaling law of Gao et al. (2024, Fig. 3) that
    dictionary_learning also uses: 2e-4 / sqrt(d_sae / 2^14)."""
    lr = hyperparams.get("lr")
    return float(lr) if lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)


def lr_factor(step: int, total: int, warmup: int, decay_frac: float) -> float:
    decay_start = int(total * (1 - decay_frac))
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


class MetricsLog:
    """Appends per-step metrics to ``metrics.jsonl`` and to Weights & Biases (offline by default)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # drop lines past the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.wandb = None
        if cfg.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(run_dir),
                                    name=f"{cfg.experiment}/{run_dir.name}",
                                    config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics["step"])

    def close(self, summary: dict | None = None) -> None:
        self.file.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update(summary)
            self.wandb.finish()


def reset_adam_rows(opt: torch.optim.Optimizer, sae: SAE, latents: torch.Tensor) -> None:
    """Zero the Adam moments of the given latents (rows of W_dec, columns of W_enc, b_enc,
    and any other parameter with a d_sae axis) after they were re-initialised."""
    for p in sae.parameters():
        state = opt.state.get(p)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key]
            if p is sae.W_enc:
                t[:, latents] = 0
            elif p.dim() >= 1 and p.shape[0] == sae.d_sae:
                t[latents] = 0


def save_checkpoint(run_dir: Path, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor,
                    step: int, scale: float) -> None:
    """Training state as safetensors + json; ``state.json`` is replaced last, atomically."""
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    tensors = {f"sae.{k}": v for k, v in sae.state_tensors().items()}
    names = dict(sae.named_parameters())
    index = {id(p): n for n, p in names.items()}
    for p, state in opt.state.items():
        for k, v in state.items():
            tensors[f"opt.{index[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["since_fired"] = since_fired.cpu()
    name = f"state-{step:08d}.safetensors"
    save_file(tensors, ckpt / (name + ".tmp"))
    os.replace(ckpt / (name + ".tmp"), ckpt / name)
    make_shareable(ckpt / name)
    (ckpt / "state.json.tmp").write_text(json.dumps({"step": step, "scale": scale, "file": name}))
    os.replace(ckpt / "state.json.tmp", ckpt / "state.json")
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(run_dir: Path, sae: SAE, opt: torch.optim.Optimizer) -> tuple[int, float, torch.Tensor]:
    """Restore SAE and optimizer in place; returns (step, scale, since_fired)."""
    meta = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    tensors = load_file(run_dir / "checkpoint" / meta["file"])
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    for name, p in sae.named_parameters():
        state = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")}
        if state:
            opt.state[p] = state
    return int(meta["step"]), float(meta["scale"]), tensors["since_fired"]


@torch.no_grad()
def evaluate(sae: SAE, store: ActivationStore, adapter: ScFMAdapter, tokens: TokenizedCells, layer: int,
             seed: int, max_cells: int, batch_size: int = 4096) -> dict:
    """Held-out metrics of an SAE acting on raw activations.

    FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all held-out tokens; explained_variance = 1 − FVU;
    l0 = mean active latents per token; dead_fraction = latents that never fire on them.
    Output loss: the model's own loss (masked-value MSE for scGPT, same masks) on up to
    ``max_cells`` held-out cells clean, with the SAE reconstruction spliced in at gene
    tokens of ``layer``, and with those tokens mean-ablated; ``loss_recovered`` =
    (ablated − spliced) / (ablated − clean).
    """
    device = next(sae.parameters()).device
    sse = sum_x2 = l0 = n = 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    for shard in store.iter_shards():
        for x in shard["acts"].split(batch_size):
            x = x.to(device).float()
            f = sae.encode(x)
            x_hat = sae.decode(f)
            sse += float((x - x_hat).pow(2).sum())
            sum_x += x.sum(0).double()
            sum_x2 += float(x.double().pow(2).sum())
            active = f > 0
            l0 += float(active.sum())
            fired |= active.any(0)
            n += len(x)
    total_var = sum_x2 - float(sum_x.pow(2).sum()) / n
    mean = (sum_x / n).float()
    metrics = {"fvu": sse / total_var, "explained_variance": 1 - sse / total_var, "l0": l0 / n,
               "dead_fraction": float((~fired).float().mean()), "n_eval_tokens": int(n)}

    cells = tokens.subset(np.arange(min(max_cells, len(tokens))))

    def loss_with(fn=None) -> float:
        gen = torch.Generator().manual_seed(seed)
        total = count = 0.0
        for batch in cells.batches(32):
            if fn is None:
                s, c = adapter.output_loss(batch, gen)
            else:
                with adapter.intervene(layer, fn):
                    s, c = adapter.output_loss(batch, gen)
            total, count = total + s, count + c
        return total / max(count, 1)

    def splice(h, mask):
        return _replace(h, mask, sae(h[mask].to(device)))

    def ablate(h, mask):
        return _replace(h, mask, mean.to(h.device).expand(int(mask.sum()), -1))

    clean, spliced, ablated = loss_with(), loss_with(splice), loss_with(ablate)
    metrics.update(loss_clean=clean, loss_spliced=spliced, loss_mean_ablated=ablated,
                   loss_delta=spliced - clean,
                   loss_recovered=(ablated - spliced) / (ablated - clean) if ablated != clean else float("nan"))
    return metrics


def _replace(h: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h [B, T, d] with the positions of ``mask`` [B, T] replaced by ``rows`` [mask.sum(), d]."""
    out = h.clone()
    out[mask] = rows.to(h.dtype)
    return out


@dataclass
class Member:
    """One SAE being trained: its config, run dir, optimizer and dead-latent counters."""

    cfg: DictConfig
    run_dir: Path
    sae: SAE
    opt: torch.optim.Optimizer
    since_fired: torch.Tensor  # [d_sae] training tokens since each latent last fired
    start: int  # steps already done
    scale: float  # input scaling factor s (the SAE trains on s·x)
    log: MetricsLog


def sweep_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(run-dir suffix, config) for every combination in ``train.sweep`` ({hyperparam: [values]});
    one ("", cfg) without a sweep. Each config names its own values and no sweep."""
    sweep = cfg.train.get("sweep")
    sweep = OmegaConf.to_container(sweep, resolve=True) if sweep else {}
    unknown = [k for k in sweep if k not in cfg.sae.hyperparams]
    if unknown:
        raise InputError(f"train.sweep: {', '.join(unknown)} not in sae.hyperparams "
                         f"({', '.join(cfg.sae.hyperparams)}); only SAE hyperparameters can share a pass.")
    combos = [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())] if sweep else [{}]
    out = []
    for combo in combos:
        member = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        member.train.sweep = None
        for key, value in combo.items():
            member.sae.hyperparams[key] = value
        out.append(("".join(f"-{k}{v}" for k, v in combo.items()), member))
    return out


def _fit(members: list[Member], train_store: ActivationStore, cfg: DictConfig, per_epoch: list[int]) -> None:
    """One pass over the training batches that steps every member SAE on each batch, from
    the earliest member's ``start``; each member checkpoints as it goes."""
    tc = cfg.train
    bs, seed, buffer_tokens = int(tc.batch_size), int(cfg.seed), int(cfg.buffer.buffer_tokens)
    total, step, start = sum(per_epoch), 0, min(m.start for m in members)
    warmup = max(1, int(tc.lr_warmup_frac * total))
    device = members[0].since_fired.device
    name = cfg.sae.architecture + (f" x{len(members)}" if len(members) > 1 else "")
    bar = tqdm(total=total, initial=start, desc=f"training {name} SAE", unit="step")
    for epoch in range(int(tc.n_epochs)):
        if step + per_epoch[epoch] <= start:  # whole epoch already done
            step += per_epoch[epoch]
            continue
        for x in train_store.iter_batches(bs, seed=seed, epoch=epoch, buffer_tokens=buffer_tokens):
            step += 1
            if step <= start:
                continue
            x, row = x.to(device), None
            for m in members:
                if step > m.start:
                    row = _step(m, x * m.scale, step, total, warmup, epoch)
            bar.update()
            if row is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", l0=f"{row['l0']:.1f}", fvu=f"{row['fvu']:.3f}")
    bar.close()


def _step(m: Member, x: torch.Tensor, step: int, total: int, warmup: int, epoch: int) -> dict | None:
    """One optimizer step of one member on batch ``x`` (scaled); returns its metrics row if logged."""
    tc, hp = m.cfg.train, m.cfg.sae.hyperparams
    sae, opt, dead_after = m.sae, m.opt, int(tc.dead_after_tokens)
    for group in opt.param_groups:
        group["lr"] = base_lr(hp, sae.d_sae) * lr_factor(step - 1, total, warmup, float(tc.lr_decay_frac))
    sparsity_warmup = int(float(tc.get("sparsity_warmup_frac", 0.0)) * total)
    sae.sparsity_scale = min(1.0, step / sparsity_warmup) if sparsity_warmup > 0 else 1.0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda and tc.autocast == "bf16"):
        out = sae.loss(x, dead=m.since_fired >= dead_after)  # parameters stay float32 (master weights)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    sae.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), float(tc.grad_clip))
    opt.step()
    sae.normalize_decoder()
    m.since_fired += len(x)
    m.since_fired[out["fired"]] = 0
    resampled = sae.after_step(step, total, m.since_fired >= dead_after, x)
    if resampled is not None and len(resampled):
        reset_adam_rows(opt, sae, resampled)
        m.since_fired[resampled] = 0
    row = None
    if step % int(tc.log_every) == 0 or step == total:
        fvu = float(out["mse"].detach() * len(x) / (x - x.mean(0)).pow(2).sum())
        row = {"step": step, "epoch": epoch, "loss": out["loss"].item(), "mse": out["mse"].item(),
               "fvu": fvu, "l0": float(out["l0"]), "lr": opt.param_groups[0]["lr"],
               "dead_fraction": float((m.since_fired >= dead_after).float().mean())}
        row.update({k: float(out[k]) for k in ("auxk", "l1") if k in out})
        m.log.log(row)
    if step % int(tc.checkpoint_every) == 0 or step == total:
        save_checkpoint(m.run_dir, sae, opt, m.since_fired, step, m.scale)
    return row


def train(cfg: DictConfig) -> Path | list[Path]:
    """Train the configured SAE (or every SAE of ``train.sweep`` on the same batches in one
    pass); returns the run dir (a list for a sweep). ``resume=true`` continues the run
    addressed by ``sae_checkpoint`` from its last checkpoint with its saved config."""
    resuming = bool(cfg.resume)
    if resuming:
        from sae4scfm.runs import load_run_config

        run_dir = Path(cfg.runs_dir) / str(cfg.sae_checkpoint.experiment) / str(cfg.sae_checkpoint.timestamp)
        if not (run_dir / "checkpoint" / "state.json").is_file():
            raise InputError(f"resume=true: {run_dir} has no checkpoint to resume from; check "
                             "sae_checkpoint.experiment and sae_checkpoint.timestamp.")
        cfg = load_run_config(run_dir)
        sweep = [("", cfg)]
    else:
        sweep = sweep_configs(cfg)
    device = pick_device(cfg.device)
    adapter, adata, tokens = load_model_and_data(cfg, device)  # validates the inputs first
    if resuming:
        plan = [(run_dir, cfg)]
    else:
        plan = [(new_run_dir(cfg.runs_dir, cfg.experiment, suffix), member) for suffix, member in sweep]
        for run_dir, member in plan:
            OmegaConf.save(member, run_dir / "config.yaml", resolve=True)
    for run_dir, _ in plan:
        print(f"run dir: {run_dir}")
    layer = int(cfg.sae.target_layer)
    stores = activation_stores(cfg, adapter, adata, tokens, [layer])
    train_store, eval_store = stores["train"][layer], stores["eval"][layer]

    tc, seed, d_in = cfg.train, int(cfg.seed), adapter.d_model
    bs, buffer_tokens = int(tc.batch_size), int(cfg.buffer.buffer_tokens)
    per_epoch = [train_store.batches_per_epoch(bs, seed=seed, epoch=e, buffer_tokens=buffer_tokens)
                 for e in range(int(tc.n_epochs))]
    if sum(per_epoch) == 0:
        raise InputError(f"train.batch_size={bs} exceeds the {train_store.n_tokens} training tokens; "
                         "lower it or use more cells (data.n_cells).")
    sample = train_store.sample(8192, seed)
    scale = input_scale(sample)
    b_dec = geometric_median(sample.to(device) * scale)
    members = []
    for run_dir, member_cfg in plan:
        torch.manual_seed(seed)
        hp = OmegaConf.to_container(member_cfg.sae.hyperparams, resolve=True)
        sae = build_sae(member_cfg.sae.architecture, d_in, int(member_cfg.sae.dictionary_multiplier * d_in), hp).to(device)
        opt = torch.optim.Adam(sae.parameters(), lr=base_lr(hp, sae.d_sae), betas=(0.9, 0.999), fused=True)
        if (run_dir / "checkpoint" / "state.json").is_file():
            start, member_scale, since_fired = load_checkpoint(run_dir, sae, opt)
            print(f"{run_dir.name}: resuming at step {start} of {sum(per_epoch)}")
        else:
            with torch.no_grad():
                sae.b_dec.copy_(b_dec)
            start, member_scale, since_fired = 0, scale, torch.zeros(sae.d_sae, dtype=torch.long)
        members.append(Member(member_cfg, run_dir, sae, opt, since_fired.to(device), start, member_scale,
                              MetricsLog(run_dir, member_cfg, start)))
    try:
        _fit(members, train_store, cfg, per_epoch)
    except KeyboardInterrupt:
        for m in members:
            print(f"\ninterrupted; continue from the last checkpoint with: resume=true "
                  f"sae_checkpoint.experiment={m.cfg.experiment} sae_checkpoint.timestamp={m.run_dir.name}")
        raise
    for m in members:
        _finish(m, adapter, eval_store, split_tokens(tokens, adata, "eval"), layer, train_store, sum(per_epoch))
    return members[0].run_dir if len(members) == 1 else [m.run_dir for m in members]


def _finish(m: Member, adapter: ScFMAdapter, eval_store: ActivationStore, eval_tokens: TokenizedCells,
            layer: int, train_store: ActivationStore, total: int) -> None:
    """Calibrate, fold the input scaling, evaluate on held-out data, write the run dir's final files."""
    cfg, sae = m.cfg, m.sae
    tc, hp = cfg.train, cfg.sae.hyperparams
    device = next(sae.parameters()).device
    batches = train_store.iter_batches(int(tc.batch_size), seed=int(cfg.seed), epoch=0,
                                       buffer_tokens=int(cfg.buffer.buffer_tokens))
    n_calibration = int(tc.get("calibration_batches", 64))
    sae.calibrate(x.to(device) * m.scale for x in itertools.islice(batches, n_calibration))
    sae.fold_input_scale(m.scale)
    sae.eval()
    results = evaluate(sae, eval_store, adapter, eval_tokens, layer, int(cfg.seed), int(tc.eval_max_cells))
    (m.run_dir / "eval.json").write_text(json.dumps(results, indent=1))
    # cfg.json is written last: a run dir counts as finished only once it exists
    sae.save(m.run_dir, {
        "input_scaling": {"factor": m.scale, "folded": True},
        "model": OmegaConf.to_container(cfg.scfm, resolve=True), "model_family": adapter.family,
        "layer": layer, "hook_point": f"hook_resid.{layer}", "d_model": adapter.d_model,
        "dataset": OmegaConf.to_container(cfg.data, resolve=True), "seed": int(cfg.seed),
        "n_train_tokens": train_store.n_tokens, "steps": total, "sae4scfm_version": __version__,
        "training": {"lr": base_lr(hp, sae.d_sae), "batch_size": int(tc.batch_size), "n_epochs": int(tc.n_epochs),
                     "tokens_seen": total * int(tc.batch_size)},
    })
    m.log.close(results)
    print(f"{m.run_dir.name} held-out: FVU {results['fvu']:.4f}  explained variance "
          f"{results['explained_variance']:.4f}  L0 {results['l0']:.2f}  dead fraction {results['dead_fraction']:.4f}  "
          f"model loss clean {results['loss_clean']:.3f} -> spliced {results['loss_spliced']:.3f} "
          f"(recovered {results['loss_recovered']:.3f})")
    print(f"run: sae_checkpoint.experiment={cfg.experiment} sae_checkpoint.timestamp={m.run_dir.name}")
