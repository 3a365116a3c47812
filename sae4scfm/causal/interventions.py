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
from typing import Callable, Sequence

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


def stack_batch(batch: Batch, copies: int) -> Batch:
    """``batch`` repeated ``copies`` times along the batch axis: [copies·B, T] (copy e = rows e·B … (e+1)·B − 1)."""
    return Batch(*(t.repeat(copies, *([1] * (t.dim() - 1))) for t in
                   (batch.gene_ids, batch.values, batch.padding_mask, batch.gene_mask, batch.cell_index)))


def _tables(interventions: Sequence[Intervention], n_cells: int, device) -> dict[str, torch.Tensor]:
    """Per-copy edit tables over the union U of touched features: touched/clamp [E, |U|] bool,
    value/scale/add [E, |U|] float32, cell_ok [E, B] bool, and U [|U|] long."""
    union = sorted({int(j) for iv in interventions for j in iv.features})
    col = {j: c for c, j in enumerate(union)}
    E, U = len(interventions), len(union)
    t = {"touched": torch.zeros(E, U, dtype=torch.bool), "clamp": torch.zeros(E, U, dtype=torch.bool),
         "value": torch.zeros(E, U), "scale": torch.ones(E, U), "add": torch.zeros(E, U),
         "firing": torch.zeros(E, dtype=torch.bool), "cell_ok": torch.ones(E, n_cells, dtype=torch.bool)}
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
    t = {k: v.to(device) for k, v in t.items()}
    t["union"] = torch.tensor(union, dtype=torch.long, device=device)
    return t


def latent_edit(sae: SAE, interventions: Sequence[Intervention], gene_ids: torch.Tensor | None = None, *,
                mode: str = "error_preserving") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The replacement ``fn(h [E·B, T, d], gene_mask [E·B, T]) -> [E·B, T, d]`` for ``adapter.intervene``
    that applies ``interventions[e]`` to copy e of a stacked batch (``stack_batch``; E = 1 for a plain
    batch). ``gene_ids`` [E·B, T], the batch's token ids, is needed only for positions given as genes.
    Edits act on gene tokens only."""
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
        rows, _ = torch.nonzero(gene_mask, as_tuple=True)
        copy, cell = (rows // B).to(device), (rows % B).to(device)
        x = h[gene_mask].to(device).float()
        f = sae.encode(x)
        if mode == "reconstruction" and len(tables["union"]) == 0:
            out_rows = sae.decode(f)
        else:
            U = tables["union"]
            f_u = f[:, U]
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
            if mode == "reconstruction":
                f_new = f.clone()
                f_new[:, U] = f_new_u
                out_rows = sae.decode(f_new)
            else:
                out_rows = x + (f_new_u - f_u) @ sae.W_dec[U]
        out = h.clone()
        out[gene_mask] = out_rows.to(h.dtype).to(h.device)
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
    batch's clean residual stream there, so the forward runs only the blocks after it. ``edit``
    (default ``latent_edit``): ``edit(sae, interventions, stacked_gene_ids, mode=mode) -> fn(h, gene_mask)``
    for interventions that are not :class:`Intervention` objects."""
    E, B = len(interventions), len(batch.cell_index)
    stacked = stack_batch(batch, E)
    edit = edit or latent_edit
    with ExitStack() as stack:
        if prefix is not None:
            stack.enter_context(adapter.starting_at(resid_layer(hook_point), prefix.repeat(E, 1, 1)))
        stack.enter_context(adapter.intervene(hook_point, edit(sae, interventions, stacked.gene_ids, mode=mode)))
        out = adapter.run(stacked)
    return {k: v.reshape(E, B, *v.shape[1:]) for k, v in out.items()}
