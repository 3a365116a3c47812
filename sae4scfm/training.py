"""The SAE training loop every architecture shares, its checkpoints, and held-out evaluation.

Inputs are scaled by one factor ``s = sqrt(d_in / E‖x‖²)`` estimated once from the
training store; the saved weights have it folded in (``SAE.fold_input_scale``) so
they act on raw activations. ``b_dec`` starts at the geometric median of the scaled
data. Each step: loss → backward → drop the decoder-gradient component parallel to
each decoder row → clip the gradient norm → Adam → renormalise decoder rows (the
decoder-norm policy; architectures that learn decoder norms opt out).
The learning rate warms up linearly and decays linearly to zero over the last
``lr_decay_frac`` of the steps. A latent is dead once it has not fired for
``dead_after_tokens`` training tokens (AuxK revives those).
"""

from __future__ import annotations

import json
import logging
import os
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
from sae4scfm.runs import new_run_dir
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


def _fit(sae: SAE, opt: torch.optim.Optimizer, train_store: ActivationStore, cfg: DictConfig, run_dir: Path,
         metrics_log: MetricsLog, per_epoch: list[int], start: int, scale: float, since_fired: torch.Tensor,
         warmup: int) -> None:
    """The optimisation loop from step ``start`` to the end; checkpoints as it goes."""
    tc, hp = cfg.train, cfg.sae.hyperparams
    bs, seed, buffer_tokens = int(tc.batch_size), int(cfg.seed), int(cfg.buffer.buffer_tokens)
    device, total, step = since_fired.device, sum(per_epoch), 0
    bar = tqdm(total=total, initial=start, desc=f"training {cfg.sae.architecture} SAE", unit="step")
    for epoch in range(int(tc.n_epochs)):
        if step + per_epoch[epoch] <= start:  # whole epoch already done
            step += per_epoch[epoch]
            continue
        for x in train_store.iter_batches(bs, seed=seed, epoch=epoch, buffer_tokens=buffer_tokens):
            if step < start:
                step += 1
                continue
            x = x.to(device) * scale
            for group in opt.param_groups:
                group["lr"] = float(hp["lr"]) * lr_factor(step, total, warmup, float(tc.lr_decay_frac))
            out = sae.loss(x, dead=since_fired >= int(tc.dead_after_tokens))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            sae.remove_parallel_decoder_grad()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), float(tc.grad_clip))
            opt.step()
            sae.normalize_decoder()
            since_fired += len(x)
            since_fired[out["fired"]] = 0
            step += 1
            resampled = sae.after_step(step, total, since_fired >= int(tc.dead_after_tokens), x)
            if resampled is not None and len(resampled):
                reset_adam_rows(opt, sae, resampled)
                since_fired[resampled] = 0
            bar.update()
            if step % int(tc.log_every) == 0 or step == total:
                fvu = float(out["mse"].detach() * len(x) / (x - x.mean(0)).pow(2).sum())
                row = {"step": step, "epoch": epoch, "loss": out["loss"].item(), "mse": out["mse"].item(),
                       "fvu": fvu, "l0": float(out["l0"]), "lr": opt.param_groups[0]["lr"],
                       "dead_fraction": float((since_fired >= int(tc.dead_after_tokens)).float().mean())}
                row.update({k: float(out[k]) for k in ("auxk", "l1") if k in out})
                metrics_log.log(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", l0=f"{row['l0']:.1f}", fvu=f"{fvu:.3f}")
            if step % int(tc.checkpoint_every) == 0 or step == total:
                save_checkpoint(run_dir, sae, opt, since_fired, step, scale)
    bar.close()


def train(cfg: DictConfig) -> Path:
    """Train one SAE as configured; returns the run dir. ``resume=true`` continues the run
    addressed by ``sae_checkpoint`` from its last checkpoint with its saved config."""
    if cfg.resume:
        from sae4scfm.runs import load_run_config

        run_dir = Path(cfg.runs_dir) / str(cfg.sae_checkpoint.experiment) / str(cfg.sae_checkpoint.timestamp)
        if not (run_dir / "checkpoint" / "state.json").is_file():
            raise InputError(f"resume=true: {run_dir} has no checkpoint to resume from; check "
                             "sae_checkpoint.experiment and sae_checkpoint.timestamp.")
        cfg = load_run_config(run_dir)
    else:
        run_dir = new_run_dir(cfg.runs_dir, cfg.experiment)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    print(f"run dir: {run_dir}")
    device = pick_device(cfg.device)
    adapter, adata, tokens = load_model_and_data(cfg, device)
    layer = int(cfg.sae.target_layer)
    stores = activation_stores(cfg, adapter, adata, tokens, [layer])
    train_store, eval_store = stores["train"][layer], stores["eval"][layer]

    torch.manual_seed(int(cfg.seed))
    d_in = adapter.d_model
    hp = OmegaConf.to_container(cfg.sae.hyperparams, resolve=True)
    sae = build_sae(cfg.sae.architecture, d_in, int(cfg.sae.dictionary_multiplier * d_in), hp).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=float(hp["lr"]), betas=(0.9, 0.999))
    tc = cfg.train
    bs, seed, buffer_tokens = int(tc.batch_size), int(cfg.seed), int(cfg.buffer.buffer_tokens)
    per_epoch = [train_store.batches_per_epoch(bs, seed=seed, epoch=e, buffer_tokens=buffer_tokens)
                 for e in range(int(tc.n_epochs))]
    total = sum(per_epoch)
    if total == 0:
        raise InputError(f"train.batch_size={bs} exceeds the {train_store.n_tokens} training tokens; "
                         "lower it or use more cells (data.n_cells).")
    warmup = max(1, int(tc.lr_warmup_frac * total))

    resumed = (run_dir / "checkpoint" / "state.json").is_file()
    if resumed:
        start, scale, since_fired = load_checkpoint(run_dir, sae, opt)
        since_fired = since_fired.to(device)
        print(f"resuming at step {start} of {total}")
    else:
        sample = train_store.sample(8192, seed)
        scale = float((d_in / sample.pow(2).sum(1).mean()).sqrt())
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(sample.to(device) * scale))
        start, since_fired = 0, torch.zeros(sae.d_sae, dtype=torch.long, device=device)

    metrics_log = MetricsLog(run_dir, cfg, start)
    try:
        _fit(sae, opt, train_store, cfg, run_dir, metrics_log, per_epoch, start, scale, since_fired, warmup)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue from the last checkpoint with: resume=true "
              f"sae_checkpoint.experiment={cfg.experiment} sae_checkpoint.timestamp={run_dir.name}")
        raise

    sae.fold_input_scale(scale)
    sae.eval()
    results = evaluate(sae, eval_store, adapter, split_tokens(tokens, adata, "eval"), layer, seed,
                       int(tc.eval_max_cells))
    sae.save(run_dir, {
        "input_scaling": {"factor": scale, "folded": True},
        "model": OmegaConf.to_container(cfg.scfm, resolve=True), "model_family": adapter.family,
        "layer": layer, "hook_point": f"hook_resid.{layer}", "d_model": d_in,
        "dataset": OmegaConf.to_container(cfg.data, resolve=True), "seed": seed,
        "n_train_tokens": train_store.n_tokens, "steps": total, "sae4scfm_version": __version__,
        "training": {"lr": float(hp["lr"]), "batch_size": bs, "n_epochs": int(tc.n_epochs), "tokens_seen": total * bs},
    })
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1))
    metrics_log.close(results)
    print(f"held-out: FVU {results['fvu']:.4f}  explained variance {results['explained_variance']:.4f}  "
          f"L0 {results['l0']:.2f}  dead fraction {results['dead_fraction']:.4f}  "
          f"model loss clean {results['loss_clean']:.3f} -> spliced {results['loss_spliced']:.3f} "
          f"(recovered {results['loss_recovered']:.3f})")
    print(f"run: sae_checkpoint.experiment={cfg.experiment} sae_checkpoint.timestamp={run_dir.name}")
    return run_dir
