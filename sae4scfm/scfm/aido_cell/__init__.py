"""AIDO.Cell behind the adapter contract: official Hugging Face folder, preprocessing, hooks.

Every cell is its full sequence: 19,264 gene tokens (log1p(CP10k), 0 where unexpressed)
then two read-depth tokens (``special``). Residual-stream layers: 0 = embeddings
(value + position), ``l`` = output of block ``l - 1`` (before the final norm).

- ``store_genes``: ``expressed`` (default) puts only the expressed genes in
  ``gene_mask``, so activation stores, features and edits cover those; ``all`` puts
  all 19,264 genes there.
- ``max_tokens_per_batch``: the forward runs in chunks of at most
  ``max(1, max_tokens_per_batch // 19,266)`` cells (``run`` and ``capture``), which
  bounds the model's working memory whatever the batch size (what ``capture`` returns,
  [B, 19,266, d] per layer, still covers the whole batch).

Outputs: ``pred`` [B, 19,264], the expression head's predicted log1p(CP10k) of every
gene (as the official reconstruction script reads it), and ``cell_emb`` [B, d], the mean
over the 19,264 gene positions of the final-normed encoder output (modelgenerator's
embedding path: the backbone drops the two depth tokens, the pooling adapter takes the
mean over the rest). ``output_loss`` is pretraining's masked-expression regression,
without its read-depth down-sampling.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import torch

from sae4scfm.errors import InputError
from sae4scfm.scfm.adapter import ScFMAdapter
from sae4scfm.scfm.aido_cell.model import AIDOCellConfig, AIDOCellModel, load_aido_cell_checkpoint
from sae4scfm.scfm.aido_cell.preprocess import DEPTH_TOKENS, AIDOCellTokens, model_genes, tokenize_cells
from sae4scfm.scfm.hooks import resume_point, resuming
from sae4scfm.scfm.tokens import Batch

STORE_GENES = ("expressed", "all")
SIZE_FIELDS = {"n_layers": "num_hidden_layers", "d_model": "hidden_size", "n_heads": "num_attention_heads",
               "d_mlp": "intermediate_size"}  # config key -> official config.json field


class AIDOCellAdapter(ScFMAdapter):
    """AIDO.Cell (3M, 10M, 100M) with the official modelgenerator preprocessing."""

    family = "aido_cell"
    published = "huggingface.co/genbio-ai/AIDO.Cell-3M, AIDO.Cell-10M and AIDO.Cell-100M"

    def __init__(self, model: AIDOCellModel, cfg: AIDOCellConfig, *, store_genes: str = "expressed",
                 max_tokens_per_batch: int | None = None, loss_mask_ratio: float = 0.3, device: str = "cpu"):
        genes = model_genes()
        vocab = {g: i for i, g in enumerate(genes)} | {t: len(genes) + i for i, t in enumerate(DEPTH_TOKENS)}
        super().__init__(model, vocab, device)
        self.cfg = cfg
        self.n_genes = len(genes)
        self.store_genes = store_genes
        self.max_tokens_per_batch = max_tokens_per_batch
        self.loss_mask_ratio = loss_mask_ratio

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path | None, device: str = "cpu", random_init: bool = False, *,
                        store_genes: str = "expressed", max_tokens_per_batch: int | None = None,
                        loss_mask_ratio: float = 0.3, n_layers: int | None = None, d_model: int | None = None,
                        n_heads: int | None = None, d_mlp: int | None = None) -> "AIDOCellAdapter":
        """Load the official folder (``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``).

        ``random_init`` keeps the architecture and re-draws the weights (official
        initialisation). ``n_layers``, ``d_model``, ``n_heads``, ``d_mlp``: the expected
        size, checked against ``config.json`` (None = accept it); with ``checkpoint_dir=None`` and
        ``random_init`` the model is built from them (official config.json defaults otherwise). The other options:
        see the module docstring and ``config/scfm/aido_cell_*.yaml``.
        """
        if store_genes not in STORE_GENES:
            raise InputError(f"scfm.store_genes={store_genes!r}: use one of {', '.join(STORE_GENES)}.")
        if max_tokens_per_batch is not None and int(max_tokens_per_batch) < 1:
            raise InputError(f"scfm.max_tokens_per_batch={max_tokens_per_batch} must be a positive token "
                             "count (or null for no limit).")
        if not 0 < float(loss_mask_ratio) < 1:
            raise InputError(f"scfm.loss_mask_ratio={loss_mask_ratio} must be a fraction in (0, 1).")
        expected = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_mlp": d_mlp}
        if checkpoint_dir is None:
            missing = [k for k, v in expected.items() if v is None]
            if not random_init or missing:
                raise InputError(f"scfm.random_init=true without scfm.checkpoint_dir builds the published size, but "
                                 f"scfm.{(missing or ['checkpoint_dir'])[0]} is null; use scfm=aido_cell_3m, "
                                 "aido_cell_10m or aido_cell_100m (their sizes are set).")
            model, cfg = None, AIDOCellConfig.from_json(
                {"hidden_size": d_model, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
                 "intermediate_size": d_mlp, "max_position_embeddings": len(model_genes())}, "scfm (published size)")
        else:
            model, cfg = load_aido_cell_checkpoint(checkpoint_dir)
        for key, want in expected.items():
            if want is not None and int(want) != getattr(cfg, key):
                raise InputError(
                    f"scfm.{key}={want} but {Path(checkpoint_dir) / 'config.json'} has "
                    f"{SIZE_FIELDS[key]}={getattr(cfg, key)}: the folder holds another AIDO.Cell size. Pick the "
                    f"matching scfm=aido_cell_* config, or set scfm.{key}=null to accept the folder's value.")
        n_genes = len(model_genes())
        if cfg.n_positions < n_genes + 2:
            raise InputError(f"{Path(checkpoint_dir) / 'config.json'}: max_position_embeddings="
                             f"{cfg.n_positions - 2} cannot hold the {n_genes:,} genes of AIDO.Cell's gene order.")
        if random_init:
            model = AIDOCellModel(cfg).eval()
        return cls(model, cfg, store_genes=store_genes, loss_mask_ratio=float(loss_mask_ratio), device=device,
                   max_tokens_per_batch=None if max_tokens_per_batch is None else int(max_tokens_per_batch))

    def tokenize(self, adata: ad.AnnData, *, gene_key: str | None = None, input_kind: str = "counts",
                 normalize_total: float | None = 1e4, log1p: bool = True, subset_hvg: bool = False,
                 n_hvg: int = 0, seed: int = 0, source: str = "data") -> AIDOCellTokens:
        """The official preprocessing of raw counts ``adata`` [cells, genes] (see ``preprocess``).
        ``n_hvg`` and ``seed`` are unused: the preprocessing is deterministic and reads all genes."""
        return tokenize_cells(adata, gene_key=gene_key, input_kind=input_kind, normalize_total=normalize_total,
                              log1p=log1p, subset_hvg=subset_hvg, store_all_genes=self.store_genes == "all",
                              pad_value=self.cfg.pad_value, source=source)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``pred`` [B, 19,264] predicted log1p(CP10k); ``cell_emb`` [B, d] mean over gene positions."""
        out = self.model(batch.values, batch.gene_ids, batch.padding_mask, batch.gene_mask)
        genes = slice(0, self.n_genes)
        return {"pred": out["pred"][:, genes], "cell_emb": out["hidden"][:, genes].mean(dim=1)}

    def cells_per_batch(self, batch_size: int) -> int:
        """At most ``max_tokens_per_batch // (19,264 + 2)`` cells (at least one) per forward."""
        if self.max_tokens_per_batch is None:
            return batch_size
        return min(batch_size, max(1, self.max_tokens_per_batch // (self.n_genes + 2)))

    def chunks(self, batch: Batch) -> list[Batch]:
        """``batch`` split into runs of at most ``max_tokens_per_batch // seq_len`` cells (at least one)."""
        n_cells, seq_len = batch.gene_ids.shape
        size = n_cells if self.max_tokens_per_batch is None else max(1, self.max_tokens_per_batch // seq_len)
        if size >= n_cells:
            return [batch]
        return [Batch(*(t[start:start + size] for t in (batch.gene_ids, batch.values, batch.padding_mask,
                                                         batch.gene_mask, batch.cell_index)))
                for start in range(0, n_cells, size)]

    def _by_chunk(self, batch: Batch, fn) -> dict[str, torch.Tensor]:
        """``fn(chunk)`` for each chunk of ``batch``, concatenated; a cached residual stream of ``starting_at``
        is cut into the same chunks."""
        start, cached = resume_point(self.model.hook_resid)
        parts, offset = [], 0
        for chunk in self.chunks(batch):
            n = len(chunk.cell_index)
            if cached is None:
                parts.append(fn(chunk))
            else:
                with resuming(self.model.hook_resid, start, cached[offset:offset + n]):
                    parts.append(fn(chunk))
            offset += n
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def run(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Outputs of ``batch``, computed chunk by chunk (interventions see each chunk's gene mask)."""
        return self._by_chunk(batch, super(AIDOCellAdapter, self).run)

    @torch.inference_mode()
    def capture(self, batch: Batch, hook_points: list) -> dict:
        """Activations {hook point: [B, T, d]} (``ScFMAdapter.capture``), captured chunk by chunk."""
        return self._by_chunk(batch, lambda chunk: super(AIDOCellAdapter, self).capture(chunk, hook_points))

    @torch.no_grad()
    def output_loss(self, batch: Batch, generator: torch.Generator) -> tuple[float, int]:
        """Masked-expression regression (the pretraining objective without read-depth down-sampling).

        Each ``gene_mask`` token is masked with probability ``loss_mask_ratio`` (mask
        drawn from ``generator``): its input value becomes ``mask_token_id`` and the loss
        is the squared error of ``pred`` against its true input value there. Returns
        (summed squared error, number of masked genes).
        """
        mask = (torch.rand(batch.gene_mask.shape, generator=generator) < self.loss_mask_ratio) & batch.gene_mask.cpu()
        masked = Batch(batch.gene_ids, batch.values.masked_fill(mask.to(batch.values.device), self.cfg.mask_value),
                       batch.padding_mask, batch.gene_mask, batch.cell_index)
        pred = self.run(masked)["pred"]
        gene_mask = mask[:, :self.n_genes].to(pred.device)
        sse = (pred - batch.values[:, :self.n_genes].to(pred.device))[gene_mask].pow(2).sum()
        return float(sse), int(gene_mask.sum())


__all__ = ["AIDOCellAdapter", "AIDOCellConfig", "AIDOCellModel", "AIDOCellTokens"]
