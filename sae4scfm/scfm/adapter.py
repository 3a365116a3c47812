"""The adapter contract every model family implements, with hook-based capture and intervention.

A family's model exposes ``hook_resid``: ``n_layers + 1`` parameter-free modules
that the residual stream passes through (index 0 = embeddings, ``l`` = output of
block ``l - 1``). Capture and intervention are forward hooks on them, so they
work the same way for every family.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import anndata as ad
import torch
from torch import nn

from sae4scfm.errors import InputError
from sae4scfm.scfm.tokens import Batch, TokenizedCells

log = logging.getLogger(__name__)


def load_official_state(model: nn.Module, state: dict[str, torch.Tensor], source, hint: str,
                        may_be_missing: tuple[str, ...] = ()) -> None:
    """Load an official state dict into ``model`` (same key names) without ever dropping a key silently.

    A tensor whose shape differs from the model's, or a missing key (except ``may_be_missing``), is
    an InputError naming ``source`` and ending with ``hint`` (what the file should match); keys the
    model does not use are listed in a log warning.
    """
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise InputError(f"{source}: tensor shapes do not match: {'; '.join(wrong[:4])}"
                         f"{' …' if len(wrong) > 4 else ''}; {hint}.")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in may_be_missing]
    if missing:
        raise InputError(f"{source}: missing state-dict keys {missing[:8]}{' …' if len(missing) > 8 else ''}; "
                         f"{hint}.")
    if result.unexpected_keys:
        log.warning("%s: ignoring %d checkpoint keys this adapter does not use: %s",
                    source, len(result.unexpected_keys), result.unexpected_keys[:8])


class _StopForward(Exception):
    pass


class ScFMAdapter:
    """A loaded single-cell foundation model; subclasses implement the family specifics."""

    family: str = "?"
    model: nn.Module
    vocab: dict[str, int]

    def __init__(self, model: nn.Module, vocab: dict[str, int], device: str = "cpu"):
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.id_to_gene = {i: g for g, i in vocab.items()}
        self.device = torch.device(device)
        self._gene_mask: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return len(self.model.hook_resid) - 1

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    # --- family-specific -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint_dir, device: str = "cpu", random_init: bool = False, **options) -> "ScFMAdapter":
        """Load the official checkpoint folder; ``random_init`` keeps the architecture and
        re-draws the weights (the untrained control). ``options``: the family's config keys."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg, device: str = "cpu") -> "ScFMAdapter":
        """From an ``scfm`` config group: ``checkpoint_dir``, ``random_init`` and the family's keys."""
        options = {k: v for k, v in dict(cfg).items() if k not in ("family", "checkpoint_dir", "random_init")}
        if not cfg.get("checkpoint_dir"):
            raise InputError(f"scfm.checkpoint_dir is not set; point it at the downloaded {cls.family} "
                             f"checkpoint folder (see config/scfm/{cfg.family}*.yaml for its layout).")
        return cls.from_pretrained(cfg.checkpoint_dir, device, random_init=bool(cfg.get("random_init", False)),
                                   **options)

    def tokenize(self, adata: ad.AnnData, **preprocess) -> TokenizedCells:
        raise NotImplementedError

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's outputs for a batch (family-specific keys, always ``cell_emb``)."""
        raise NotImplementedError

    def output_loss(self, batch: Batch, generator: torch.Generator) -> tuple[float, int]:
        """The model's own training loss on ``batch``: (sum of per-item losses, item count)."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------
    def cells_per_batch(self, batch_size: int) -> int:
        """Cells per forward for a requested ``batch_size`` (families with long sequences cap it)."""
        return batch_size

    def check_layer(self, layer: int, field: str = "sae.target_layer") -> int:
        if not 0 <= int(layer) <= self.n_layers:
            raise InputError(
                f"{field}={layer} is out of range: this {self.family} model has {self.n_layers} "
                f"blocks, so residual-stream layers are 0 (embeddings) to {self.n_layers}."
            )
        return int(layer)

    def run(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward with the batch's gene mask visible to interventions."""
        self._gene_mask = batch.gene_mask.to(self.device)
        try:
            return self.forward(batch.to(self.device))
        finally:
            self._gene_mask = None

    @torch.no_grad()
    def capture(self, batch: Batch, layers: list[int]) -> dict[int, torch.Tensor]:
        """Residual stream at ``layers``: {layer: [B, T, d]}; the forward stops after the last one.

        Use ``batch.gene_mask`` to select gene tokens (special tokens and padding are
        included in the tensor but flagged there).
        """
        layers = sorted({self.check_layer(layer, "layers") for layer in layers})
        captured: dict[int, torch.Tensor] = {}

        def hook_for(layer: int):
            def hook(_module, _inputs, output):
                captured[layer] = output.detach()
                if layer == layers[-1]:
                    raise _StopForward
            return hook

        handles = [self.model.hook_resid[layer].register_forward_hook(hook_for(layer)) for layer in layers]
        try:
            self.run(batch)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    @contextmanager
    def intervene(self, layer: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the context, every forward replaces the residual stream at ``layer`` by
        ``fn(h [B, T, d], gene_mask [B, T])``."""
        self.check_layer(layer, "layer")

        def hook(_module, _inputs, output):
            return fn(output, self._gene_mask)

        handle = self.model.hook_resid[layer].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
