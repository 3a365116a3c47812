"""The adapter contract every model family implements, with named hook points for capture and intervention.

A family's model passes its activations through parameter-free ``HookPoint`` modules
(``sae4scfm.scfm.hooks``), together with the call's gene mask. Named hook points:

- ``resid.{l}`` (or the int ``l``), l = 0..n_layers: the residual stream (``model.hook_resid``;
  0 = embeddings, ``l`` = output of block ``l - 1``);
- ``attn_out.{b}``, ``mlp_out.{b}``, b = 0..n_layers-1: the attention and MLP (feed-forward)
  sublayer outputs of block ``b`` (``model.blocks[b].hook_attn_out`` / ``hook_mlp_out``), i.e.
  what the block adds to its residual input, before any post-norm. Pre-norm blocks
  (AIDO.Cell, scFoundation's performer): ``resid[b+1] = resid[b] + attn_out[b] + mlp_out[b]``.
  Post-norm blocks (scGPT, Geneformer, scFoundation's transformer):
  ``resid[b+1] = LN2(LN1(resid[b] + attn_out[b]) + mlp_out[b])``.

Capture and intervention are actions at those points scoped to the caller's context,
so the adapter holds no per-call state: calls are re-entrant, interventions nest, and
two threads (or two adapters) never see each other's.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import anndata as ad
import numpy as np
import torch
from torch import nn

from sae4scfm.errors import InputError
from sae4scfm.scfm.hooks import HookPoint, acting, resuming
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


HookPointName = int | str


class ScFMAdapter:
    """A loaded single-cell foundation model; subclasses implement the family specifics.

    ``published``: where the family's official weights are (named in the missing-checkpoint error).
    """

    family: str = "?"
    published: str = "?"
    model: nn.Module
    vocab: dict[str, int]

    def __init__(self, model: nn.Module, vocab: dict[str, int], device: str = "cpu"):
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.id_to_gene = {i: g for g, i in vocab.items()}
        self.device = torch.device(device)
        points = {f"resid.{layer}": point for layer, point in enumerate(model.hook_resid)}
        for b, block in enumerate(model.blocks):
            points[f"attn_out.{b}"] = block.hook_attn_out
            points[f"mlp_out.{b}"] = block.hook_mlp_out
        self.hook_points: dict[str, HookPoint] = points  # fixed at construction

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
        re-draws the weights (the untrained control). With ``checkpoint_dir=None`` and
        ``random_init`` the architecture is the published size in ``options`` (the YAML).
        ``options``: the family's config keys."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg, device: str = "cpu") -> "ScFMAdapter":
        """From an ``scfm`` config group: ``checkpoint_dir``, ``random_init`` and the family's keys.

        Without ``checkpoint_dir``, ``random_init=true`` builds an untrained model of the
        published size given in the config; otherwise it is an InputError saying where the
        official weights are published."""
        options = {k: v for k, v in dict(cfg).items() if k not in ("family", "checkpoint_dir", "random_init")}
        random_init = bool(cfg.get("random_init", False))
        if not cfg.get("checkpoint_dir"):
            if not random_init:
                raise InputError(
                    f"scfm.checkpoint_dir is not set; point it at the downloaded {cls.family} checkpoint folder "
                    f"(see config/scfm/{cfg.family}*.yaml for its layout). The official weights are published "
                    f"at {cls.published}. For an untrained control of the published size, without any "
                    "download, set scfm.random_init=true.")
            log.info("scfm.random_init=true without scfm.checkpoint_dir: an untrained %s of the size given "
                     "in the scfm config", cls.family)
            return cls.from_pretrained(None, device, random_init=True, **options)
        return cls.from_pretrained(cfg.checkpoint_dir, device, random_init=random_init, **options)

    def tokenize(self, adata: ad.AnnData, **preprocess) -> TokenizedCells:
        raise NotImplementedError

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's outputs for a batch already on the device (family-specific keys, always
        ``cell_emb``); the family passes ``batch.gene_mask`` to the model's hook points."""
        raise NotImplementedError

    def output_loss(self, batch: Batch, generator: torch.Generator) -> tuple[float, int]:
        """The model's own training loss on ``batch``: (sum of per-item losses, item count)."""
        raise NotImplementedError

    @property
    def reads_any_gene(self) -> bool:
        """Whether ``vocab_readout`` exists: a head that predicts genes outside a cell's input."""
        return False

    def vocab_readout(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's predicted expression of every vocabulary gene from the outputs ``out`` of ``run``,
        whether the cell's input holds the gene or not: (values [B, G], gene ids [G]) over the G non-special
        vocabulary genes. Families whose heads read only the input genes have none."""
        raise InputError(f"this {self.family} model has no readout of genes outside a cell's input (scGPT's GEPC "
                         "head has one: output=mvc_vocab); choose a per-token output such as mlm.")

    # --- shared -----------------------------------------------------------------
    def vocab_genes(self, identifiers: np.ndarray) -> np.ndarray:
        """The vocabulary entry of each dataset gene identifier ('' where it has none). The identity
        for families whose vocabulary is keyed by the dataset's identifiers; Geneformer maps
        symbols to its Ensembl IDs."""
        return np.asarray(identifiers, dtype=object)

    def gene_symbols(self) -> dict[str, str]:
        """{vocabulary gene: its symbol} for vocabularies of gene IDs with a gene-name dictionary
        (Geneformer); empty where the vocabulary is keyed by the dataset's own names."""
        return {}

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

    def hook_point_name(self, hook_point: HookPointName, field: str = "hook_point") -> str:
        """The name of ``hook_point``: an int ``l`` is ``resid.{l}``; an unknown name is an InputError."""
        if isinstance(hook_point, int) and not isinstance(hook_point, bool):
            return f"resid.{self.check_layer(hook_point, field)}"
        if hook_point not in self.hook_points:
            last = self.n_layers - 1
            raise InputError(
                f"{field}={hook_point!r} is not a hook point of this {self.family} model; valid: resid.0 .. "
                f"resid.{self.n_layers} (or the layer number), attn_out.0 .. attn_out.{last}, mlp_out.0 .. "
                f"mlp_out.{last}.")
        return str(hook_point)

    def run(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's outputs on ``batch`` (moved to the device), with this context's interventions."""
        return self.forward(batch.to(self.device))

    @torch.inference_mode()
    def capture(self, batch: Batch, hook_points: list[HookPointName]) -> dict[HookPointName, torch.Tensor]:
        """Activations {hook point as given: [B, T, d]}; the forward stops once all are captured.

        Ints are residual-stream layers (``resid.{l}``). Use ``batch.gene_mask`` to select
        gene tokens (special tokens and padding are included in the tensor but flagged there).
        Interventions active in this context apply before the capture.
        """
        names = {key: self.hook_point_name(key, "hook_points") for key in hook_points}
        wanted = set(names.values())
        captured: dict[str, torch.Tensor] = {}

        def action_for(name: str):
            def action(x, _gene_mask):
                captured[name] = x.detach()
                if len(captured) == len(wanted):
                    raise _StopForward
            return action

        with ExitStack() as stack:
            for name in wanted:
                stack.enter_context(acting(self.hook_points[name], action_for(name)))
            try:
                self.run(batch)
            except _StopForward:
                pass
        return {key: captured[name] for key, name in names.items()}

    @contextmanager
    def starting_at(self, layer: int, h: torch.Tensor) -> Iterator[None]:
        """Within the context (this thread only), every forward takes ``h`` [B, T, d] (e.g. from ``capture``
        of the same batch) as its residual stream at ``layer`` and skips the blocks before it: "run from
        layer l" on cached inputs. Interventions at ``layer`` or later still apply (to ``h`` first)."""
        with resuming(self.model.hook_resid, self.check_layer(layer, "layer"), h):
            yield

    def run_from(self, layer: int, h: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's outputs on ``batch`` whose residual stream at ``layer`` is ``h`` [B, T, d]."""
        with self.starting_at(layer, h.to(self.device)):
            return self.run(batch)

    @contextmanager
    def intervene(self, hook_point: HookPointName,
                  fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the context (this thread only), every forward replaces the activation at
        ``hook_point`` (an int = residual-stream layer, or a name) by ``fn(h [B, T, d], gene_mask [B, T])``,
        with the gene mask of that forward. Nested contexts compose (outer first at one point)."""
        with acting(self.hook_points[self.hook_point_name(hook_point, "layer")], fn):
            yield
