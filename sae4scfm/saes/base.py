"""The parameters, encode/decode, persistence and decoder-norm policy every SAE shares.

Shapes: x [N, d_in] activations, f [N, d_sae] latents, W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]. ``encode`` subtracts ``b_dec``
first (the pre-encoder bias of Bricken et al. / Gao et al.).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sae4scfm.atomic import atomic_write, atomic_write_json
from sae4scfm.errors import InputError
from sae4scfm.saes.config import SAEConfig

if TYPE_CHECKING:
    from sae4scfm.saes.interop import Tensors

# architecture name -> SAE class; every subclass that sets ``architecture`` registers itself
ARCHITECTURES: dict[str, type[SAE]] = {}


class SAE(nn.Module):
    """Base class; an architecture sets ``architecture`` (its config name, which registers it),
    ``config_class`` (its hyperparameters) and overrides ``encode`` and ``loss``.

    ``SAE(d_in, d_sae, cfg)`` or ``SAE(d_in, d_sae, **hyperparams)``: hyperparameters not given
    take the defaults of ``config_class``; unknown keys and wrong types raise ``InputError``.
    """

    architecture = "base"
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # False: decoder rows keep their learned norms (e.g. the ‖W_dec,i‖-weighted L1 SAE);
    # ``normalize_decoder`` and ``remove_parallel_decoder_grad`` are then no-ops.
    unit_norm_decoder = True
    # Factor in [0, 1] on the sparsity coefficient of penalised architectures, set by the trainer
    # before each step (linear warm-up from 0 over ``train.sparsity_warmup_frac``); 1 outside training.
    sparsity_scale = 1.0
    # SAELens architecture with the same inference, written by ``saelens_export`` (None: not exportable)
    saelens_architecture: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "architecture" not in cls.__dict__:
            return
        old = ARCHITECTURES.get(cls.architecture)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"SAE architecture {cls.architecture!r} of {cls.__qualname__} is already "
                            f"registered by {old.__module__}.{old.__qualname__}; choose another name.")
        ARCHITECTURES[cls.architecture] = cls

    def __init__(self, d_in: int, d_sae: int, cfg: SAEConfig | None = None, **hyperparams):
        super().__init__()
        if cfg is None:
            cfg = self.config_class.from_dict(hyperparams, self.architecture)
        elif hyperparams or not isinstance(cfg, self.config_class):
            raise InputError(f"{type(self).__name__} takes a {self.config_class.__name__} or keyword "
                             "hyperparameters, not both.")
        self.cfg = cfg
        # as written to cfg.json; ``lr`` is the trainer's (training/schedules.py::base_lr)
        self.d_in, self.d_sae = d_in, d_sae
        self.hyperparams = {k: v for k, v in cfg.to_dict().items() if k != "lr"}
        W = torch.nn.init.kaiming_uniform_(torch.empty(d_sae, d_in))
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W.clone())
        self.W_enc = nn.Parameter(W.t().contiguous())  # tied initialisation
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """[N, d_in] -> [N, d_sae] encoder pre-activations."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training loss. ``dead`` [d_sae] bool marks latents that have not fired lately.
        Returns ``loss`` (to minimise), ``mse`` (‖x − x̂‖² per token, batch mean), ``l0``
        (mean active latents per token) and ``fired`` [d_sae] bool (latents active in the batch)."""
        raise NotImplementedError

    def after_step(self, step: int, total: int, dead: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Called by the trainer after each optimizer step (``step`` counts from 1 to ``total``)
        with the current ``dead`` mask [d_sae] and the batch ``x`` [N, d_in] (scaled inputs).
        Schedules (annealing) and dead-latent resampling live here. Returns the indices of
        latents whose weights were re-initialised, so the trainer resets their Adam state."""
        return None

    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Called once after the last step with scaled training batches (each [B, d_in]) to set
        inference statistics at the final weights (BatchTopK's threshold); a no-op by default."""

    # --- decoder-norm policy --------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if not self.unit_norm_decoder:
            return
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row."""
        if self.W_dec.grad is None or not self.unit_norm_decoder:
            return
        W = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)
        self.W_dec.grad -= (self.W_dec.grad * W).sum(dim=1, keepdim=True) * W

    # --- input scaling ----------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` act on raw ``x`` with identical latents:
        W_enc *= scale, b_dec /= scale, W_dec /= scale (thresholds on latents unchanged)."""
        self.W_enc *= scale
        self.b_dec /= scale
        self.W_dec /= scale

    # --- persistence --------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    def save(self, run_dir: str | Path, cfg: dict) -> None:
        run_dir = Path(run_dir)
        tensors = self.state_tensors()
        atomic_write(run_dir / "sae.safetensors", lambda tmp: save_file(tensors, tmp))
        meta = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                "hyperparams": self.hyperparams, **cfg}
        atomic_write_json(run_dir / "cfg.json", meta, default=str)  # last: a run with cfg.json is finished

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], hyperparams: dict, source: str) -> SAE:
        """An eval-mode SAE whose whole state dict is ``tensors`` (cast to float32), d_in and d_sae
        read off W_enc [d_in, d_sae]. Missing, extra or mis-shaped tensors and bad hyperparameters
        raise an ``InputError`` naming ``source`` (the file they came from)."""
        W_enc = tensors["W_enc"]
        if W_enc.ndim != 2 or 0 in W_enc.shape:
            raise InputError(f"{source}: the encoder weight has shape {tuple(W_enc.shape)}, not [d_in, d_sae]; "
                             "the file is truncated or not an SAE checkpoint.")
        d_in, d_sae = (int(n) for n in W_enc.shape)
        try:
            sae = cls(d_in, d_sae, cls.config_class.from_dict(hyperparams, cls.architecture, source))
        except InputError as e:
            raise (e if str(e).startswith(source) else InputError(f"{source}: {e}")) from None
        expected = sae.state_dict()
        missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        if missing or extra:  # a hook's bug rather than the file's: hooks read every tensor they need
            raise InputError(f"{source}: {cls.architecture} SAE tensors missing {missing}, unexpected {extra}.")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(expected[name].shape):
                raise InputError(f"{source}: {name} has shape {list(t.shape)}, but an SAE with d_in={d_in} and "
                                 f"d_sae={d_sae} (the encoder weight's shape) needs {list(expected[name].shape)}; "
                                 "the file's tensors do not belong together (truncated or edited file).")
        sae.load_state_dict({k: v.detach().float().clone() for k, v in tensors.items()})
        return sae.eval()

    # --- interop hooks (sae4scfm/saes/interop.py) ------------------------------------
    def saelens_export(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(weights, extra cfg.json entries) of a ``saelens_architecture`` SAE with these latents."""
        raise NotImplementedError

    @classmethod
    def from_saelens(cls, weights: Tensors, cfg: dict) -> SAE:
        """Our SAE from a SAELens ``saelens_architecture`` folder's weights and cfg.json (defined
        by the one class that imports that SAELens architecture)."""
        raise NotImplementedError

    @classmethod
    def from_dictionary_learning(cls, sd: Tensors, apply_b_dec_to_input: bool) -> SAE:
        """Our SAE from a dictionary_learning 0.1.0 state dict (defined by each class with a
        dictionary_learning counterpart; see ``interop.import_dictionary_learning``)."""
        raise NotImplementedError


def base_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """W_enc, W_dec, b_enc, b_dec as contiguous float32 CPU tensors (for export)."""
    return {k: getattr(sae, k).detach().float().contiguous().cpu() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}


def fold_b_dec_into_b_enc(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """b_enc for ours of a reference that does not subtract b_dec before encoding:
    x W + b  ==  (x − b_dec) W + (b + b_dec W)."""
    return b_enc + b_dec @ W_enc


def has_unit_rows(W_dec: torch.Tensor) -> bool:
    """Whether every decoder row [d_sae, d_in] has norm 1 (to 1e-4)."""
    norms = W_dec.norm(dim=1)
    return bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-4))


class _SelectedPreActs(torch.autograd.Function):
    """Encoder pre-activations at selected entries (``rows``, ``cols``), with gradients that
    touch only those entries: cost O(nnz · d_in) instead of a dense [N, d_sae] backward GEMM."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, rows, cols, values):
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, b_dec, rows, cols = ctx.saved_tensors
        d_in, d_sae = W_enc.shape
        # d pre[r, c] / d W_enc[:, c] = x_r - b_dec: a sparse [d_sae, N] @ dense [N, d_in] product
        order = torch.argsort(cols)
        crow = torch.searchsorted(cols[order], torch.arange(d_sae + 1, device=cols.device))
        with warnings.catch_warnings():  # "CSR support is in beta": we use only CSR @ dense
            warnings.simplefilter("ignore", UserWarning)
            S = torch.sparse_csr_tensor(crow, rows[order], grad[order], (d_sae, len(x)), check_invariants=False)
        grad_W_enc = (S @ (x - b_dec)).t()
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return None, grad_W_enc, grad_b_enc, -(W_enc @ grad_b_enc), None, None, None


def selected_pre_acts(sae: SAE, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      values: torch.Tensor) -> torch.Tensor:
    """``values`` [nnz] = pre_acts(x)[rows, cols] (computed without grad) made differentiable
    with respect to W_enc, b_enc and b_dec through the selected entries only."""
    # parameter dtype even under bf16 autocast: only the dense encoder GEMM runs in low precision
    return _SelectedPreActs.apply(x, sae.W_enc, sae.b_enc, sae.b_dec, rows, cols, values.to(sae.W_enc.dtype))


def auxk_loss(sae: SAE, x: torch.Tensor, e: torch.Tensor, dead: torch.Tensor | None, aux_k: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024): ‖e − ê‖² / ‖e − ē‖², where ê = the decoder applied to the top
    ``aux_k`` ReLU'd pre-activations of ``dead`` latents only (pre-activations of the dead
    columns are computed here, so the cost scales with their number); ``e`` [N, d_in] is the
    detached residual of ``x`` [N, d_in]. Zero when no latent is dead."""
    if dead is None or not dead.any():
        return torch.zeros((), device=e.device)
    dead_idx = dead.nonzero().squeeze(1)
    pre = (x - sae.b_dec) @ sae.W_enc[:, dead_idx] + sae.b_enc[dead_idx]
    values, local = pre.topk(min(aux_k, len(dead_idx)), dim=-1, sorted=False)
    e_hat = F.embedding_bag(dead_idx[local], sae.W_dec, per_sample_weights=F.relu(values).to(sae.W_dec.dtype),
                            mode="sum")
    aux = (e - e_hat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
    return torch.nan_to_num(aux, nan=0.0)


def load_sae(run_dir: str | Path, device: str = "cpu") -> tuple[SAE, dict]:
    """The SAE of a run dir and its cfg.json; weights act on raw (unscaled) activations."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "cfg.json").read_text())
    cls = ARCHITECTURES.get(cfg.get("architecture"))
    if cls is None:
        raise InputError(f"{run_dir / 'cfg.json'}: architecture {cfg.get('architecture')!r} is unknown; "
                         f"available: {', '.join(ARCHITECTURES)}.")
    hp = cls.config_class.from_dict(cfg.get("hyperparams", {}), cls.architecture, str(run_dir / "cfg.json"))
    sae = cls(cfg["d_in"], cfg["d_sae"], hp)
    sae.load_state_dict(load_file(run_dir / "sae.safetensors"))
    return sae.to(device).eval(), cfg
