"""Interventions on SAE latents inside a model's forward, one mechanism for every causal analysis.

An ``Intervention`` edits some features of the SAE's code at one hook point: ``clamp`` them to α
(``zero`` is clamp to 0, an ablation), ``scale`` them by α, or ``add`` α (in ``error_preserving``
mode that adds α·W_dec[j] to the residual), on chosen token positions (every gene token, the gene
tokens where that feature fires in the clean code, or tokens of listed genes) and chosen cells.
Two modes, always named (``../shared/DESIGN.md``):

- ``error_preserving`` (default): h' = h + (f' − f)·W_dec, i.e. SAE'(h) + (h − SAE(h)); an empty
  or identity edit leaves the forward exactly unchanged;
- ``reconstruction``: h' = SAE'(h) = decode(f'), the SAE spliced in with the edited code.

Many interventions run in ONE forward: ``stacked_run`` repeats the batch once per intervention
along the batch axis (copy e holds rows e·B … (e+1)·B − 1) and applies intervention e to copy e.
Only the union U of the features any intervention touches is edited, so the work per token is
[|U|], not [d_sae], beyond the SAE's own encoder.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from sae4scfm.errors import InputError
from sae4scfm.saes.base import SAE
from sae4scfm.scfm.adapter import HookPointName, ScFMAdapter
from sae4scfm.scfm.tokens import Batch

MODES = ("error_preserving", "reconstruction")
OPS = ("clamp", "scale", "add", "zero")
POSITIONS = ("all", "firing")


@dataclass(frozen=True)
class Intervention:
    """Edit ``features`` (SAE latent indices) by ``op`` with ``alpha`` (one value for all, or one
    per feature) at ``positions``: ``all`` gene tokens, ``firing`` (the gene tokens where that
    feature is > 0 in the clean code), or a tuple of vocabulary ids (gene tokens of those genes);
    in the batch rows ``cells`` (positions in the batch; None = every cell). No features = no edit."""

    features: tuple[int, ...] = ()
    op: str = "clamp"
    alpha: float | tuple[float, ...] = 0.0
    positions: str | tuple[int, ...] = "all"
    cells: tuple[int, ...] | None = None

    def alphas(self) -> tuple[float, ...]:
        if isinstance(self.alpha, (int, float)):
            return (float(self.alpha),) * len(self.features)
        if len(self.alpha) != len(self.features):
            raise InputError(f"intervention alpha has {len(self.alpha)} values for {len(self.features)} features; "
                             "give one α per feature, or a single α for all.")
        return tuple(float(a) for a in self.alpha)


def check(interventions: Sequence[Intervention], sae: SAE, mode: str) -> None:
    """InputError for an unknown mode/op/position or a feature index outside the SAE."""
    if mode not in MODES:
        raise InputError(f"intervention mode={mode!r} is unknown; use one of {', '.join(MODES)}.")
    for iv in interventions:
        if iv.op not in OPS:
            raise InputError(f"intervention op={iv.op!r} is unknown; use one of {', '.join(OPS)}.")
        if isinstance(iv.positions, str) and iv.positions not in POSITIONS:
            raise InputError(f"intervention positions={iv.positions!r} is unknown; use all, firing or a list of "
                             "vocabulary ids.")
        bad = [j for j in iv.features if not 0 <= int(j) < sae.d_sae]
        if bad:
            raise InputError(f"feature ids {bad} are out of range: this SAE has features 0..{sae.d_sae - 1}.")
        iv.alphas()


def take_cells(batch: Batch, cells: torch.Tensor) -> Batch:
    """The rows ``cells`` [R] long of ``batch``, in that order (repeats allowed): [R, T]."""
    return Batch(*(t[cells.to(t.device)] for t in
                   (batch.gene_ids, batch.values, batch.padding_mask, batch.gene_mask, batch.cell_index)))


def stack_batch(batch: Batch, copies: int) -> Batch:
    """``batch`` repeated ``copies`` times along the batch axis: [copies·B, T] (copy e = rows e·B … (e+1)·B − 1)."""
    return take_cells(batch, torch.arange(len(batch.cell_index)).repeat(copies))


def code_rows(gene_mask: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """For the rows ``cells`` [R] of a batch with ``gene_mask`` [B, T]: the index, among the batch's N gene
    tokens (``h[gene_mask]`` order), of each of the M gene tokens of those rows: [M] long."""
    row_of = torch.full(gene_mask.shape, -1, dtype=torch.long, device=gene_mask.device)
    row_of[gene_mask] = torch.arange(int(gene_mask.sum()), device=gene_mask.device)
    cells = cells.to(gene_mask.device)
    return row_of[cells][gene_mask[cells]]


def prefix_code(sae: SAE, prefix: torch.Tensor, gene_mask: torch.Tensor,
                cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent_edit(clean=...)`` for a forward of the rows ``cells`` [R] of a batch from its cached clean
    state ``prefix`` [B, T, d]: (code [N, d_sae], the SAE code of the batch's N gene tokens, encoded once;
    ``code_rows``)."""
    gene_mask = gene_mask.to(prefix.device)
    return sae.encode(prefix[gene_mask].float()), code_rows(gene_mask, cells)


def _tables(interventions: Sequence[Intervention], n_cells: int, device) -> dict[str, torch.Tensor]:
    """Per-copy edit tables over the union U of touched features: touched/clamp [E, |U|] bool,
    value/scale/add [E, |U|] float32, firing [E] bool, cell_ok [E, B] bool, and U [|U|] long."""
    union = sorted({int(j) for iv in interventions for j in iv.features})
    col = {j: c for c, j in enumerate(union)}
    E, U = len(interventions), len(union)
    t = {"touched": np.zeros((E, U), bool), "clamp": np.zeros((E, U), bool), "value": np.zeros((E, U), np.float32),
         "scale": np.ones((E, U), np.float32), "add": np.zeros((E, U), np.float32), "firing": np.zeros(E, bool),
         "cell_ok": np.ones((E, n_cells), bool)}
    for e, iv in enumerate(interventions):
        for j, a in zip(iv.features, iv.alphas()):
            c = col[int(j)]
            t["touched"][e, c] = True
            if iv.op in ("clamp", "zero"):
                t["clamp"][e, c], t["value"][e, c] = True, (0.0 if iv.op == "zero" else a)
            elif iv.op == "scale":
                t["scale"][e, c] = a
            else:
                t["add"][e, c] = a
        t["firing"][e] = iv.positions == "firing"
        if iv.cells is not None:
            t["cell_ok"][e] = False
            t["cell_ok"][e, list(iv.cells)] = True
    out = {k: torch.from_numpy(v).to(device) for k, v in t.items()}
    out["union"] = torch.tensor(union, dtype=torch.long, device=device)
    return out


def latent_edit(sae: SAE, interventions: Sequence[Intervention], gene_ids: torch.Tensor | None = None, *,
                mode: str = "error_preserving",
                clean: tuple[torch.Tensor, torch.Tensor] | None = None) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                    torch.Tensor]:
    """The replacement ``fn(h [E·B, T, d], gene_mask [E·B, T]) -> [E·B, T, d]`` for ``adapter.intervene``
    that applies ``interventions[e]`` to copy e of a stacked batch (``stack_batch``; E = 1 for a plain
    batch). ``gene_ids`` [E·B, T], the batch's token ids, is needed only for positions given as genes.
    Edits act on gene tokens only, and only the token rows an edit changes are written.
    ``clean`` (``prefix_code``): the SAE code of the state this hook point will see, known in advance (a run
    from a cached clean prefix), so the SAE encoder does not run per copy."""
    check(interventions, sae, mode)
    E = len(interventions)
    if E == 0:
        raise ValueError("no interventions; an empty edit is Intervention()")
    gene_lists = [torch.tensor(iv.positions, dtype=torch.long) if not isinstance(iv.positions, str) else None
                  for iv in interventions]
    if gene_ids is None and any(g is not None for g in gene_lists):
        raise ValueError("positions given as genes need the batch's gene_ids")

    def fn(h: torch.Tensor, gene_mask: torch.Tensor) -> torch.Tensor:
        if h.shape[0] % E:
            raise ValueError(f"{h.shape[0]} rows cannot hold {E} stacked copies")
        B = h.shape[0] // E
        device = next(sae.parameters()).device
        tables = _tables(interventions, B, device)
        U = tables["union"]
        rows, cols = torch.nonzero(gene_mask, as_tuple=True)
        copy, cell = (rows // B).to(device), (rows % B).to(device)
        if clean is None:
            f = sae.encode(h[gene_mask].to(device).float())
            f_u = f[:, U]
        else:
            code, code_rows = clean
            if len(code_rows) != len(rows):
                raise ValueError(f"clean code for {len(code_rows)} gene tokens, the forward has {len(rows)}")
            f = code[code_rows] if mode == "reconstruction" else None
            f_u = code[:, U][code_rows]
        edited = torch.where(tables["clamp"][copy], tables["value"][copy], f_u * tables["scale"][copy]
                             + tables["add"][copy])
        apply = tables["touched"][copy] & tables["cell_ok"][copy, cell][:, None]
        apply &= ~tables["firing"][copy][:, None] | (f_u > 0)
        for e, listed in enumerate(gene_lists):
            if listed is not None:
                genes = gene_ids.to(device)[gene_mask]
                in_copy = copy == e
                apply[in_copy] &= torch.isin(genes[in_copy], listed.to(device))[:, None]
        f_new_u = torch.where(apply, edited, f_u)
        out = h.clone()
        if mode == "reconstruction":
            f_new = f.clone()
            f_new[:, U] = f_new_u
            out[gene_mask] = sae.decode(f_new).to(h.dtype).to(h.device)
        else:
            delta = f_new_u - f_u
            moved = torch.nonzero((delta != 0).any(1), as_tuple=True)[0]
            step = (delta[moved] @ sae.W_dec[U]).to(h.dtype).to(h.device)
            r, c = rows[moved.to(rows.device)], cols[moved.to(cols.device)]
            out[r, c] = (h[r, c].to(device).float() + step.float()).to(h.dtype)
        return out

    return fn


def resid_layer(hook_point: HookPointName) -> int | None:
    """The residual-stream layer of ``hook_point`` (an int, or ``resid.{l}``); None for attn/mlp hook points."""
    if isinstance(hook_point, int) and not isinstance(hook_point, bool):
        return hook_point
    name = str(hook_point)
    return int(name.split(".", 1)[1]) if name.startswith("resid.") else None


def clean_prefix(adapter: ScFMAdapter, hook_point: HookPointName, batch: Batch) -> torch.Tensor | None:
    """The batch's clean residual stream at ``hook_point`` [B, T, d] for ``stacked_run(prefix=...)`` (None
    where the hook point is not on the residual stream)."""
    layer = resid_layer(hook_point)
    return None if layer is None else adapter.capture(batch, [layer])[layer]


def stacked_run(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, batch: Batch,
                interventions: Sequence, *, mode: str = "error_preserving",
                prefix: torch.Tensor | None = None, edit: Callable | None = None) -> dict[str, torch.Tensor]:
    """The model's outputs under each intervention, in one forward: {output: [E, B, ...]} for
    E = len(interventions) and the B cells of ``batch``; ``hook_point`` is where the SAE reads
    (a residual-stream layer number or a hook point name). ``prefix`` [B, T, d] (``clean_prefix``): the
    batch's clean residual stream there, so the forward runs only the blocks after it and the SAE encodes
    the clean state once, not once per copy. ``edit`` (default ``latent_edit``): the edit factory
    ``edit(sae, interventions, stacked_gene_ids, mode=mode, clean=clean) -> fn(h, gene_mask)``, for
    interventions that are not :class:`Intervention` objects (``clean``: ``prefix_code`` or None)."""
    E, B = len(interventions), len(batch.cell_index)
    cells = torch.arange(B).repeat(E)
    stacked = take_cells(batch, cells)
    edit = edit or latent_edit
    with ExitStack() as stack:
        clean = None
        if prefix is not None:
            stack.enter_context(adapter.starting_at(resid_layer(hook_point), prefix[cells.to(prefix.device)]))
            clean = prefix_code(sae, prefix, batch.gene_mask, cells)
        stack.enter_context(adapter.intervene(hook_point, edit(sae, interventions, stacked.gene_ids, mode=mode,
                                                               clean=clean)))
        out = adapter.run(stacked)
    return {k: v.reshape(E, B, *v.shape[1:]) for k, v in out.items()}


def ablation_runs(adapter: ScFMAdapter, sae: SAE, hook_point: HookPointName, batch: Batch, features: Sequence[int],
                  read: Callable[[Batch], dict], *, per_forward: int = 16,
                  clean_h: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Zero-ablate each of ``features`` (error_preserving, every gene token) at ``hook_point`` in each cell of
    ``batch`` where it fires: up to ``per_forward`` × B (feature, cell) pairs stacked per forward, the SAE code of
    the clean activation there (``clean_h`` [B, T, d], captured when None) encoded once, and on the residual
    stream every forward starting from that cached state. Yields per forward (feature positions [R] in
    ``features``, cell positions [R] in ``batch``, ``read(stacked batch)``: what the caller reads, e.g.
    ``adapter.capture`` of downstream layers, which stops the forward there). Pairs where the feature is silent
    are never run: ablating a silent feature in ``error_preserving`` mode leaves that cell's forward exactly clean."""
    batch = batch.to(adapter.device)
    if clean_h is None:
        clean_h = adapter.capture(batch, [hook_point])[hook_point]
    layer = resid_layer(hook_point)
    mask = batch.gene_mask.to(clean_h.device)
    code = sae.encode(clean_h[mask].float())
    token_cell = torch.nonzero(mask, as_tuple=True)[0]
    feats = torch.tensor([int(j) for j in features], dtype=torch.long, device=code.device)
    fires = torch.zeros(len(batch.cell_index), len(feats), device=code.device).index_add_(
        0, token_cell, (code[:, feats] > 0).float()) > 0  # [B, F]
    pair_feature, pair_cell = torch.nonzero(fires.T, as_tuple=True)  # feature-major
    size = max(1, per_forward) * len(batch.cell_index)
    for start in range(0, len(pair_cell), size):
        fi, ci = pair_feature[start:start + size], pair_cell[start:start + size]
        edit = latent_edit(sae, [Intervention((int(feats[i]),), "zero") for i in fi.tolist()],
                           clean=(code, code_rows(mask, ci)))
        with ExitStack() as stack:
            if layer is not None:
                stack.enter_context(adapter.starting_at(layer, clean_h[ci]))
            stack.enter_context(adapter.intervene(hook_point, edit))
            out = read(take_cells(batch, ci))
        yield fi.cpu(), ci.cpu(), out
