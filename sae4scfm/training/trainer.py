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
revives those). Batches come from ``store.buffer.ShufflingBuffer``: uniform samples of the
training store in an order that is a pure function of (seed, epoch), so dead-latent counts see
every kind of cell and resume is exact. ``sae.hook_point`` picks the rows: gene tokens (``tokens``,
the default) or one vector per cell (``cell_mean``, ``cls``; ``store.extract.cell_vectors``), for which
batch sizes and ``dead_after_tokens`` count cells and the model-loss splice is not evaluated (NaN in
eval.json: a per-cell code has no place in the forward). After the last step ``SAE.calibrate`` sets inference
statistics at the final weights from ``calibration_batches`` such batches (BatchTopK's threshold).
Under torchrun (``training.distributed``) one SAE trains with DistributedDataParallel at the same
global batch (each rank steps on its slice; firing counters and logged metrics are all-reduced), and
the members of a sweep are spread over the ranks round robin. Checkpoints are written in the
background (``CheckpointWriter``) and a resumed run seeks the buffer to its step.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sae4scfm import __version__
from sae4scfm.atomic import atomic_write_json, atomic_write_text
from sae4scfm.errors import InputError
from sae4scfm.runs import load_run_config, new_run_dir, resolve_checkpointed_run
from sae4scfm.saes import SAE, build_sae, check_hyperparams, sae_class
from sae4scfm.scfm import ScFMAdapter
from sae4scfm.scfm.loading import load_model_and_data, pick_device, split_tokens
from sae4scfm.scfm.tokens import TokenizedCells
from sae4scfm.store.buffer import ShufflingBuffer
from sae4scfm.store.extract import CELL_HOOK_POINTS, activation_stores, cls_token_id, sae_hook_point
from sae4scfm.store.shards import ActivationStore
from sae4scfm.training.checkpoint import CheckpointWriter, load_checkpoint
from sae4scfm.training.distributed import (
    Ranks,
    all_reduce_,
    barrier,
    broadcast_object,
    data_parallel,
    rank_device,
    ranks,
)
from sae4scfm.training.evaluation import evaluate
from sae4scfm.training.schedules import base_lr, geometric_median, input_scale, lr_factor

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends per-step metrics to ``metrics.jsonl`` and to Weights & Biases (offline by default)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # drop lines past the checkpoint we resume from
            atomic_write_text(self.path, "".join(line + "\n" for line in _metric_lines(self.path, resume_step)))
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


# The latent axis of each per-latent parameter, by the names the SAE zoo shares (the gate's
# r_mag/b_mag, JumpReLU's log_threshold); an SAE with another per-latent parameter declares a
# ``latent_axes`` {name: axis} class attribute. ``b_dec`` [d_in] has none.
LATENT_AXES = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "r_mag": 0, "b_mag": 0, "log_threshold": 0}


def latent_axes(sae: SAE) -> dict[str, int]:
    """{parameter name: its d_sae axis} for the parameters of ``sae``: ``sae.latent_axes`` if the
    class declares it, else those of ``LATENT_AXES`` it has."""
    axes = getattr(sae, "latent_axes", LATENT_AXES)
    names = dict(sae.named_parameters())
    return {name: axis for name, axis in axes.items() if name in names}


def _metric_lines(path: Path, last_step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to ``last_step``. A run killed mid-write can leave a
    half-written last line: it is dropped with a warning; a malformed line before it is an error."""
    lines = path.read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropping a half-written last line (the run was killed mid-write)", path)
                break
            raise InputError(f"{path}: line {i + 1} is not JSON; fix or delete that line and resume again.")
        if row["step"] <= last_step:
            kept.append(line)
    return kept


def reset_adam_rows(opt: torch.optim.Optimizer, sae: SAE, latents: torch.Tensor) -> None:
    """Zero the Adam moments of the given latents along each parameter's latent axis
    (``latent_axes``: columns of W_enc, rows of W_dec, entries of b_enc, ...) after they were
    re-initialised; parameters without a latent axis (``b_dec``) keep theirs."""
    params = dict(sae.named_parameters())
    for name, axis in latent_axes(sae).items():
        state = opt.state.get(params[name])
        for key in ("exp_avg", "exp_avg_sq"):
            if state and key in state:
                state[key].index_fill_(axis, latents.to(state[key].device), 0)


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
    log: MetricsLog | None  # None: metrics rows are returned by ``train_step``, not written
    checkpoints: CheckpointWriter | None = None  # None: no checkpoints (a rank other than 0 under DDP)
    loss_fn: torch.nn.Module | None = None  # DistributedDataParallel of the SAE's loss; None: ``sae.loss``
    world: int = 1  # ranks whose slices make up each batch (DDP); 1: ``x`` is the whole batch


def sweep_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(run-dir suffix, config) for every combination in ``train.sweep`` ({hyperparam: [values]})
    and every layer of ``train.layers``; one ("", cfg) without either. Each config names its own
    values (and ``sae.target_layer``) and no sweep."""
    sweep = cfg.train.get("sweep")
    sweep = OmegaConf.to_container(sweep, resolve=True) if sweep else {}
    if not isinstance(sweep, dict):
        raise InputError(f"train.sweep={sweep!r} must map hyperparameters to lists of values, "
                         "e.g. 'train.sweep={k:[8,16,32]}'.")
    scalars = [k for k, v in sweep.items() if not isinstance(v, list) or not v]
    if scalars:
        raise InputError(f"train.sweep: {', '.join(f'{k}={sweep[k]!r}' for k in scalars)} must be a non-empty "
                         f"list of values, e.g. 'train.sweep={{{scalars[0]}:[{sweep[scalars[0]]!r}]}}' (or set "
                         f"sae.hyperparams.{scalars[0]} for a single value).")
    unknown = [k for k in sweep if k not in cfg.sae.hyperparams]
    if unknown:
        raise InputError(f"train.sweep: {', '.join(unknown)} not in sae.hyperparams "
                         f"({', '.join(cfg.sae.hyperparams)}); only SAE hyperparameters can share a pass.")
    combos = [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())] if sweep else [{}]
    layers = cfg.train.get("layers")
    layers = OmegaConf.to_container(layers, resolve=True) if OmegaConf.is_config(layers) else layers
    if layers is not None and (not isinstance(layers, list) or not layers
                               or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers)):
        raise InputError(f"train.layers={layers!r} must be a non-empty list of layer numbers, e.g. "
                         "'train.layers=[1,2,3]' (or null for sae.target_layer alone).")
    out = []
    for layer in layers or [None]:
        for combo in combos:
            member = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
            member.train.sweep = None
            member.train.layers = None
            suffix = "".join(f"-{k}{v}" for k, v in combo.items())
            if layer is not None:
                member.sae.target_layer = layer
                suffix += f"-layer{layer}"
            for key, value in combo.items():
                member.sae.hyperparams[key] = value
            out.append((suffix, member))
    return out


def shuffling_buffer(cfg: DictConfig, store: ActivationStore, r: Ranks = Ranks()) -> ShufflingBuffer:
    """The training batches of ``cfg`` (train.batch_size, seed, buffer.*) drawn from ``store``;
    rank ``r.rank``'s slice of each (``Ranks()``: whole batches)."""
    return ShufflingBuffer(store, int(cfg.train.batch_size), int(cfg.seed), int(cfg.buffer.buffer_tokens),
                           int(cfg.buffer.chunk_tokens), int(cfg.buffer.get("prefetch", 2)), r.rank, r.world)


def _fit(members: list[Member], buffer: ShufflingBuffer, cfg: DictConfig) -> None:
    """One pass over the training batches that steps every member SAE on each batch, from
    the earliest member's ``start`` (the buffer seeks there); each member checkpoints as it goes."""
    tc = cfg.train
    per_epoch = len(buffer)
    total, step, start = per_epoch * int(tc.n_epochs), 0, min(m.start for m in members)
    warmup = max(1, int(tc.lr_warmup_frac * total))
    device = members[0].since_fired.device
    name = cfg.sae.architecture + (f" x{len(members)}" if len(members) > 1 else "")
    bar = tqdm(total=total, initial=start, desc=f"training {name} SAE", unit="step", disable=members[0].log is None)
    for epoch in range(int(tc.n_epochs)):
        skip = min(per_epoch, max(0, start - step))  # batches of this epoch already done
        step += skip
        for x in buffer.epoch(epoch, skip):
            step += 1
            x, row = x.to(device, non_blocking=True), None
            for m in members:
                if step > m.start:
                    row = train_step(m, x * m.scale, step, total, warmup, epoch)
            bar.update()
            if row is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", l0=f"{row['l0']:.1f}", fvu=f"{row['fvu']:.3f}")
    bar.close()


def train_step(m: Member, x: torch.Tensor, step: int, total: int, warmup: int, epoch: int) -> dict | None:
    """THE training step (the trainer, tests and benchmarks all call this one): one optimizer
    step of member ``m`` on the scaled batch ``x`` [B, d_in] as step ``step`` of ``total``
    (1-based; ``warmup`` lr-warmup steps), updating its dead-latent counters, logging every
    ``train.log_every`` and checkpointing every ``train.checkpoint_every`` steps and at the last.
    Returns the metrics row when one was logged."""
    tc, hp = m.cfg.train, m.cfg.sae.hyperparams
    sae, opt, dead_after = m.sae, m.opt, int(tc.dead_after_tokens)
    for group in opt.param_groups:
        group["lr"] = base_lr(hp, sae.d_sae) * lr_factor(step - 1, total, warmup, float(tc.lr_decay_frac))
    sparsity_warmup = int(float(tc.sparsity_warmup_frac) * total)
    sae.sparsity_scale = min(1.0, step / sparsity_warmup) if sparsity_warmup > 0 else 1.0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda and tc.autocast == "bf16"):
        # parameters stay float32 (master weights); under DDP the backward averages gradients over ranks
        out = (m.loss_fn or sae.loss)(x, m.since_fired >= dead_after)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    sae.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), float(tc.grad_clip))
    opt.step()
    sae.normalize_decoder()
    fired = out["fired"]
    if m.world > 1:  # a latent fired if it fired on any rank's slice
        fired = all_reduce_(fired.to(torch.int32)) > 0
    m.since_fired += len(x) * m.world
    m.since_fired[fired] = 0
    resampled = sae.after_step(step, total, m.since_fired >= dead_after, x)
    if resampled is not None and len(resampled):
        reset_adam_rows(opt, sae, resampled)
        m.since_fired[resampled] = 0
    row = None
    if step % int(tc.log_every) == 0 or step == total:
        row = {"step": step, "epoch": epoch, **_batch_metrics(out, x, m.world), "lr": opt.param_groups[0]["lr"],
               "dead_fraction": float((m.since_fired >= dead_after).float().mean())}
        if m.log is not None:
            m.log.log(row)
    if m.checkpoints is not None and (step % int(tc.checkpoint_every) == 0 or step == total):
        m.checkpoints.save(sae, opt, m.since_fired, step, m.scale)
    return row


def _batch_metrics(out: dict, x: torch.Tensor, world: int) -> dict[str, float]:
    """loss, mse, fvu, l0 (and auxk, l1) of the step's whole batch: under DDP the mean of the ranks'
    slices (equal sizes), with FVU = Σ squared error / Σ‖x − x̄‖² over the global batch."""
    names = ["loss", "mse", "l0"] + [k for k in ("auxk", "l1") if k in out]
    x = x.detach().float()
    means = torch.stack([out[k].detach().float() for k in names])
    if world == 1:
        sq_dev = float((x - x.mean(0)).pow(2).sum())
    else:  # Σ‖x − x̄‖² = Σ‖x‖² − ‖Σx‖² / N over the N = n·world rows of the global batch
        stats = all_reduce_(torch.cat([means, x.sum(0), x.pow(2).sum()[None]]))
        means, total_sum, total_sq = stats[:len(names)] / world, stats[len(names):-1], stats[-1]
        sq_dev = float(total_sq - total_sum.pow(2).sum() / (len(x) * world))
    row = {k: float(v) for k, v in zip(names, means)}
    row["fvu"] = row["mse"] * len(x) * world / sq_dev
    return {k: row[k] for k in ["loss", "mse", "fvu", "l0", *names[3:]]}


def train(cfg: DictConfig) -> Path | list[Path]:
    """Train the configured SAE (or every SAE of ``train.sweep`` on the same batches in one
    pass); returns the run dir (a list for a sweep). ``resume=true`` continues the run
    addressed by ``sae_checkpoint`` (``timestamp=latest``: the newest run of the experiment
    with a checkpoint) from its last checkpoint with its saved config."""
    resuming = bool(cfg.resume)
    if resuming:
        run_dir = resolve_checkpointed_run(cfg.runs_dir, cfg.sae_checkpoint.experiment, cfg.sae_checkpoint.timestamp)
        saved = load_run_config(run_dir)
        saved.buffer = OmegaConf.merge(cfg.buffer, saved.buffer)  # buffer keys added since the run started
        cfg = saved
        sweep = [("", cfg)]
    else:
        sweep = sweep_configs(cfg)
    for _, member in sweep:  # bad hyperparameters stop before the model and data are loaded
        check_hyperparams(member.sae.architecture, OmegaConf.to_container(member.sae.hyperparams, resolve=True))
    hook = sae_hook_point(cfg.sae)
    device = pick_device(cfg.device)
    r = ranks(device)  # under torchrun: joins the process group
    device = rank_device(device, r)
    # one SAE on several ranks: DistributedDataParallel; several: spread over the ranks round robin
    ddp = r.world > 1 and len(sweep) == 1
    if ddp:
        _check_data_parallel(cfg, r)
    adapter, adata, tokens = load_model_and_data(cfg, device)  # validates the inputs first
    if hook == "cls":
        cls_token_id(adapter, tokens)
    _check_splits(cfg, adata, tokens)
    if resuming:
        plan = [(run_dir, cfg)]
    else:
        dirs = None
        if r.is_main:
            dirs = [new_run_dir(cfg.runs_dir, cfg.experiment, suffix) for suffix, _ in sweep]
            for run_dir, (_, member) in zip(dirs, sweep):
                OmegaConf.save(member, run_dir / "config.yaml", resolve=True)
        plan = list(zip(broadcast_object(dirs), [member for _, member in sweep]))
    if r.is_main:
        for run_dir, _ in plan:
            print(f"run dir: {run_dir}")
    layers = sorted({adapter.check_layer(int(c.sae.target_layer), "train.layers") for _, c in plan})
    stores = activation_stores(cfg, adapter, adata, tokens, layers)  # one pass; each rank extracts its shards
    mine = plan if ddp else plan[r.rank::r.world]
    for layer in layers:
        group = [(run_dir, c) for run_dir, c in mine if int(c.sae.target_layer) == layer]
        if group:
            _train_layer(cfg, group, stores["train"][layer], stores["eval"][layer], layer, adapter,
                         split_tokens(tokens, adata, "eval"), device, r if ddp else None)
    barrier()
    dirs = [run_dir for run_dir, _ in plan]
    return dirs[0] if len(dirs) == 1 else dirs


def _train_layer(cfg: DictConfig, group: list[tuple[Path, DictConfig]], train_store: ActivationStore,
                 eval_store: ActivationStore, layer: int, adapter: ScFMAdapter, eval_tokens: TokenizedCells,
                 device: str, ddp: Ranks | None) -> None:
    """Train the SAEs of ``group`` (run dir, config) on the batches of ``train_store`` in one pass
    (``ddp``: this rank's part of one DistributedDataParallel SAE), then finish their run dirs."""
    seed, d_in = int(cfg.seed), adapter.d_model
    buffer = shuffling_buffer(cfg, train_store, ddp or Ranks())
    total = len(buffer) * int(cfg.train.n_epochs)
    sample = train_store.sample(8192, seed)
    scale = input_scale(sample)
    b_dec = geometric_median(sample.to(device) * scale)
    members = []
    for run_dir, member_cfg in group:
        torch.manual_seed(seed)
        hp = OmegaConf.to_container(member_cfg.sae.hyperparams, resolve=True)
        sae = build_sae(member_cfg.sae.architecture, d_in, int(member_cfg.sae.dictionary_multiplier * d_in), hp).to(device)
        opt = torch.optim.Adam(sae.parameters(), lr=base_lr(hp, sae.d_sae), betas=(0.9, 0.999), fused=True)
        if (run_dir / "checkpoint" / "state.json").is_file():
            start, member_scale, since_fired = load_checkpoint(run_dir, sae, opt)
            print(f"{run_dir.name}: resuming at step {start} of {total}")
        else:
            with torch.no_grad():
                sae.b_dec.copy_(b_dec)
            start, member_scale, since_fired = 0, scale, torch.zeros(sae.d_sae, dtype=torch.long)
        main = ddp is None or ddp.is_main  # writes this member's run dir
        members.append(Member(member_cfg, run_dir, sae, opt, since_fired.to(device), start, member_scale,
                              MetricsLog(run_dir, member_cfg, start) if main else None,
                              CheckpointWriter(run_dir) if main else None,
                              data_parallel(sae) if ddp else None, ddp.world if ddp else 1))
    try:
        _fit(members, buffer, cfg)
    except KeyboardInterrupt:
        for m in members:
            print(f"\ninterrupted; continue from the last checkpoint with: resume=true "
                  f"sae_checkpoint.experiment={m.cfg.experiment} sae_checkpoint.timestamp={m.run_dir.name}")
        raise
    finally:
        for m in members:
            if m.checkpoints is not None:
                m.checkpoints.wait()
    whole = shuffling_buffer(cfg, train_store) if ddp else buffer  # calibration on whole batches
    for m in members:
        if m.log is not None:
            _finish(m, adapter, eval_store, eval_tokens, layer, whole, total)


def _check_data_parallel(cfg: DictConfig, r: Ranks) -> None:
    """One SAE under DistributedDataParallel: the global batch splits evenly over the ranks, and
    the architecture does not change its weights from the batch outside the gradient step
    (resampling draws from one rank's slice, so ranks would diverge)."""
    bs = int(cfg.train.batch_size)
    if bs % r.world:
        raise InputError(f"train.batch_size={bs} is not divisible by the torchrun world size {r.world}; "
                         f"each rank takes batch_size / world rows of every global batch.")
    if sae_class(cfg.sae.architecture).after_step is not SAE.after_step:
        raise InputError(f"sae={cfg.sae.architecture} resamples latents from the batch, which one rank's slice "
                         "cannot do under DistributedDataParallel; train it in one process, or as one of "
                         "several train.sweep members (spread over the ranks, one whole SAE each).")


def _check_splits(cfg: DictConfig, adata, tokens: TokenizedCells) -> None:
    """Before any run dir exists: the eval split has rows to evaluate on and the train split at
    least one batch (rows are what the store will hold: gene tokens, plus specials on request,
    or one per cell for a cell-level ``sae.hook_point``)."""
    bs, per_cell = int(cfg.train.batch_size), sae_hook_point(cfg.sae) in CELL_HOOK_POINTS
    rows = "cells" if per_cell else "tokens"
    for split in ("train", "eval"):
        t = split_tokens(tokens, adata, split)
        n = len(t) if per_cell else int(t.lengths.sum()) if cfg.buffer.include_special else t.n_gene_tokens
        fix = "raise data.n_cells" + (" or data.preprocess.split" if split == "eval" else "")
        if n == 0:
            raise InputError(f"the {split} split is empty ({len(t)} cells, no {rows}; data.n_cells="
                             f"{cfg.data.get('n_cells')}, data.preprocess.split={cfg.data.preprocess.split}); {fix}.")
        if split == "train" and n < bs:
            raise InputError(f"train.batch_size={bs} exceeds the {n} training {rows}"
                             f"{' (sae.hook_point=' + cfg.sae.hook_point + ': one row per cell)' if per_cell else ''}"
                             f"; lower it or {fix}.")


def _finish(m: Member, adapter: ScFMAdapter, eval_store: ActivationStore, eval_tokens: TokenizedCells,
            layer: int, buffer: ShufflingBuffer, total: int) -> None:
    """Calibrate on the first ``train.calibration_batches`` training batches (uniform samples of the
    store, ``ShufflingBuffer``), fold the input scaling, evaluate on held-out data, write the run
    dir's final files."""
    cfg, sae = m.cfg, m.sae
    tc, hp = cfg.train, cfg.sae.hyperparams
    train_store = buffer.store
    device = next(sae.parameters()).device
    n_calibration = int(tc.calibration_batches)
    sae.calibrate(x.to(device) * m.scale for x in itertools.islice(buffer.epoch(0), n_calibration))
    sae.fold_input_scale(m.scale)
    sae.eval()
    hook = sae_hook_point(cfg.sae)
    per_cell = hook in CELL_HOOK_POINTS  # a per-cell code has no place in the model's forward: no splice
    results = evaluate(sae, eval_store, adapter, eval_tokens, layer, int(cfg.seed),
                       0 if per_cell else int(tc.eval_max_cells))
    if per_cell:
        results.update({k: float("nan") for k in ("loss_clean", "loss_spliced", "loss_mean_ablated", "loss_delta",
                                                   "loss_recovered")})
    atomic_write_json(m.run_dir / "eval.json", results)
    # cfg.json is written last: a run dir counts as finished only once it exists
    sae.save(m.run_dir, {
        "input_scaling": {"factor": m.scale, "folded": True},
        "model": OmegaConf.to_container(cfg.scfm, resolve=True), "model_family": adapter.family,
        "layer": layer, "hook_point": f"hook_resid.{layer}" + (f".{hook}" if per_cell else ""),
        "sae_hook_point": hook, "d_model": adapter.d_model,
        "dataset": OmegaConf.to_container(cfg.data, resolve=True), "seed": int(cfg.seed),
        "n_train_tokens": train_store.n_tokens, "steps": total, "sae4scfm_version": __version__,
        "training": {"lr": base_lr(hp, sae.d_sae), "batch_size": int(tc.batch_size), "n_epochs": int(tc.n_epochs),
                     "tokens_seen": total * int(tc.batch_size)},
    })
    m.log.close(results)
    print(f"{m.run_dir.name} held-out: FVU {results['fvu']:.4f}  explained variance "
          f"{results['explained_variance']:.4f}  L0 {results['l0']:.2f}  dead fraction {results['dead_fraction']:.4f}  "
          + (f"(per {hook} vector; no model-loss splice for a cell-level SAE)" if per_cell else
             f"model loss clean {results['loss_clean']:.3f} -> spliced {results['loss_spliced']:.3f} "
             f"(recovered {results['loss_recovered']:.3f})"))
    print(f"run: sae_checkpoint.experiment={cfg.experiment} sae_checkpoint.timestamp={m.run_dir.name}")
