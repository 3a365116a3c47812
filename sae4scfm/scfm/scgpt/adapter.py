"""scGPT behind the adapter contract (``sae4scfm.scfm.adapter``)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.scgpt.model import (
    SPECIAL_TOKENS,
    ScGPTConfig,
    ScGPTModel,
    load_scgpt_checkpoint,
    masked_value_loss,
)
from sae4scfm.scfm.scgpt.tokenizer import random_value_mask, tokenize_cells
from sae4scfm.scfm.tokens import Batch, TokenizedCells

log = logging.getLogger(__name__)

ARCHITECTURE_FIELDS = ("d_model", "n_layers", "n_heads", "d_hid")
OPTIONS = ("cls_value", "max_seq_len", "mask_ratio", "architecture")


class ScGPTAdapter(ScFMAdapter):
    """An scGPT model with its vocabulary and the tokenization settings it was trained with.

    ``cls_value``: input value of ``<cls>`` (None = ``cfg.pad_value``); ``mask_ratio``:
    fraction of gene values masked by ``output_loss``.
    """

    family = "scgpt"
    published = ("the scGPT GitHub README (github.com/bowang-lab/scGPT, 'Pretrained scGPT Model Zoo': "
                 "Google Drive folders, e.g. whole-human)")

    def __init__(self, model: ScGPTModel, vocab: dict[str, int], cfg: ScGPTConfig, device: str = "cpu", *,
                 cls_value: float | None = None, mask_ratio: float = 0.4):
        super().__init__(model, vocab, device)
        self.cfg = cfg
        self.cls_value = cls_value
        self.mask_ratio = mask_ratio

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path | None, device: str = "cpu", random_init: bool = False,
                        **options) -> "ScGPTAdapter":
        """Load an official folder (``best_model.pt``, ``args.json``, ``vocab.json``).

        ``random_init`` keeps the architecture and draws untrained weights (official init);
        with ``checkpoint_dir=None`` it builds the ``architecture`` sizes (``published_config``).
        Options (``config/scfm/scgpt*.yaml``): ``cls_value`` (None = args.json pad_value),
        ``max_seq_len`` (None = args.json), ``mask_ratio`` (0.4), ``architecture``
        ({d_model, n_layers, n_heads, d_hid} the checkpoint must have; None = any).
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InputError(f"scfm.{unknown[0]} is not an option of the scgpt family; its options are "
                             f"{', '.join(OPTIONS)} (see config/scfm/scgpt.yaml).")
        if checkpoint_dir is None:
            if not random_init:
                raise InputError("scfm.checkpoint_dir is not set; point it at the downloaded scGPT folder.")
            vocab = published_vocab()
            cfg = published_config(options.get("architecture"), len(vocab))
            model = None
        else:
            model, vocab, cfg = load_scgpt_checkpoint(checkpoint_dir)
            check_architecture(cfg, options.get("architecture"), checkpoint_dir)
        if random_init:
            model = ScGPTModel(cfg, pad_id=vocab[cfg.pad_token])
            model.init_official_weights()
        max_seq_len = options.get("max_seq_len")
        if max_seq_len is not None:
            if int(max_seq_len) < 2:
                raise InputError(f"scfm.max_seq_len={max_seq_len}: use at least 2 (<cls> and one gene), or null.")
            cfg = dataclasses.replace(cfg, max_seq_len=int(max_seq_len))
        mask_ratio = float(options.get("mask_ratio", 0.4))
        if not 0 < mask_ratio < 1:
            raise InputError(f"scfm.mask_ratio={mask_ratio}: use a fraction strictly between 0 and 1.")
        cls_value = options.get("cls_value")
        return cls(model, vocab, cfg, device, cls_value=None if cls_value is None else float(cls_value),
                   mask_ratio=mask_ratio)

    def tokenize(self, adata: ad.AnnData, *, gene_key: str | None = None, input_kind: str = "counts",
                 normalize_total: float | None = 1e4, log1p: bool = True, subset_hvg: bool = False,
                 n_hvg: int = 1200, seed: int = 0, source: str = "data") -> TokenizedCells:
        """Official scGPT preprocessing and tokenization (``tokenizer.tokenize_cells``), seeded by ``seed``."""
        return tokenize_cells(
            adata, self.vocab, self.cfg, np.random.default_rng(seed), cls_value=self.cls_value,
            gene_key=gene_key, input_kind=input_kind, normalize_total=normalize_total, log1p=log1p,
            subset_hvg=subset_hvg, n_hvg=n_hvg, source=source,
        )

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Outputs of ``ScGPTModel.forward``: ``mlm``, ``cell_emb`` and the checkpoint's other heads."""
        return self.model(batch.gene_ids, batch.values, batch.padding_mask, batch.gene_mask)

    @property
    def reads_any_gene(self) -> bool:
        return self.cfg.do_mvc

    def vocab_readout(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """GEPC (``mvc``) from ``out["cell_emb"]`` for every non-special vocabulary gene: ([B, G], ids [G])."""
        if not self.cfg.do_mvc:
            raise InputError("this scGPT checkpoint has no GEPC head (mvc_decoder.*), so it cannot read out genes "
                             "outside a cell's input; choose output=mlm.")
        ids = self._readout_ids.to(out["cell_emb"].device)
        return self.model.vocab_expression(out["cell_emb"], ids), ids

    @functools.cached_property
    def _readout_ids(self) -> torch.Tensor:
        """The non-special vocabulary ids [G], sorted."""
        special = {self.vocab[t] for t in SPECIAL_TOKENS if t in self.vocab}
        return torch.tensor(sorted(set(self.vocab.values()) - special))

    @torch.no_grad()
    def output_loss(self, batch: Batch, generator: torch.Generator) -> tuple[float, int]:
        """Masked-value loss (``masked_value_loss``) with ``mask_ratio`` of gene values masked by ``generator``."""
        mask = random_value_mask(batch, self.mask_ratio, generator)
        loss, n = masked_value_loss(self.model, batch.to(self.device), mask.to(self.device), forward=self.run)
        return float(loss), int(n)


def check_architecture(cfg: ScGPTConfig, expected: dict | None, checkpoint_dir: str | Path) -> None:
    """InputError when a size config (e.g. ``scfm=scgpt_human``) points at a checkpoint of another size."""
    if not expected:
        return
    unknown = sorted(set(expected) - set(ARCHITECTURE_FIELDS))
    if unknown:
        raise InputError(f"scfm.architecture.{unknown[0]} is unknown; use {', '.join(ARCHITECTURE_FIELDS)}.")
    differ = {k: (v, getattr(cfg, k)) for k, v in expected.items() if v is not None and int(v) != getattr(cfg, k)}
    if differ:
        found = ", ".join(f"{k}={have} (expected {want})" for k, (want, have) in differ.items())
        raise InputError(f"scfm.checkpoint_dir: {checkpoint_dir} holds a model with {found}; this scfm config "
                         "is for another published size. Use scfm=scgpt for any scGPT folder.")


def published_config(architecture: dict | None, n_tokens: int) -> ScGPTConfig:
    """The untrained model's config: ``architecture`` sizes (all four required) and the whole-human
    ``args.json`` for the rest (n_bins 51, pad/mask values -2/-1, max_seq_len 1200, GEPC head)."""
    sizes = dict(architecture or {})
    missing = [k for k in ARCHITECTURE_FIELDS if sizes.get(k) is None]
    if missing:
        raise InputError(f"scfm.random_init=true without scfm.checkpoint_dir builds the model from scfm.architecture, "
                         f"which lacks {', '.join(missing)}; use scfm=scgpt_human (the published whole-human "
                         "sizes) or set scfm.architecture={d_model:..,n_layers:..,n_heads:..,d_hid:..}.")
    unknown = sorted(set(sizes) - set(ARCHITECTURE_FIELDS))
    if unknown:
        raise InputError(f"scfm.architecture.{unknown[0]} is unknown; use {', '.join(ARCHITECTURE_FIELDS)}.")
    return ScGPTConfig(n_tokens=n_tokens, **{k: int(sizes[k]) for k in ARCHITECTURE_FIELDS})


def published_vocab() -> dict[str, int]:
    """The vocabulary of an untrained scGPT without a checkpoint, special tokens appended.

    The whole-human gene list ``default_census_vocab.json`` of the ``scgpt`` wheel where it is
    installed (60,694 genes: with the three special tokens, the published 60,697 rows), else the
    19,264 gene symbols shipped with sae4scfm (scFoundation's gene order). Read, never imported.
    """
    spec = importlib.util.find_spec("scgpt")
    census = Path(spec.origin).parent / "tokenizer" / "default_census_vocab.json" if spec and spec.origin else None
    if census is not None and census.is_file():
        genes = sorted(json.loads(census.read_text()).items(), key=lambda item: item[1])
        names, source = [g for g, _ in genes], str(census)
    else:
        from sae4scfm.scfm.scfoundation.preprocess import scfoundation_genes

        names, source = list(scfoundation_genes()), "the 19,264 genes shipped in sae4scfm/resources"
    vocab = {g: i for i, g in enumerate(n for n in names if n not in SPECIAL_TOKENS)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    log.info("untrained scGPT: vocabulary of %d tokens from %s", len(vocab), source)
    return vocab
