"""Hook points: named places in a model's forward where activations are captured or replaced.

A ``HookPoint`` is a parameter-free module the forward passes an activation through,
together with that call's gene mask: ``x = point(x, gene_mask)``. What happens there
is decided by the *actions* active in the caller's context (``acting``), not by state
on the model or the adapter: actions live in a ``ContextVar``, so they apply to the
forwards of the thread (or task) that entered them and to no other, nest (several
actions at one point apply in the order they were entered), and a forward run from
inside an action sees its own gene mask, never the outer call's.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import nn

Action = Callable[[torch.Tensor, "torch.Tensor | None"], "torch.Tensor | None"]

_ACTIONS: ContextVar[tuple[tuple["HookPoint", Action], ...]] = ContextVar("sae4scfm_hook_actions", default=())


class HookPoint(nn.Module):
    """``forward(x [B, T, d], gene_mask [B, T] bool or None) -> x`` after this context's actions here.

    An action ``fn(x, gene_mask)`` returns the replacement activation, or None to leave it.
    """

    def forward(self, x: torch.Tensor, gene_mask: torch.Tensor | None = None) -> torch.Tensor:
        for point, fn in _ACTIONS.get():
            if point is self:
                out = fn(x, gene_mask)
                if out is not None:
                    x = out
        return x


@contextmanager
def acting(point: HookPoint, fn: Action) -> Iterator[None]:
    """Within the context (this thread/task only), every forward through ``point`` calls ``fn`` there."""
    token = _ACTIONS.set(_ACTIONS.get() + ((point, fn),))
    try:
        yield
    finally:
        _ACTIONS.reset(token)


# A forward may start from a cached residual stream: ``resuming(hook_resid, l, h)`` makes the model whose
# residual hook points are ``hook_resid`` take ``h`` [B, T, d] as its layer-l state and skip blocks 1..l
# (the embedding itself is still computed where other heads need it). Actions at hook points at or after l
# still apply; the cached state passes through hook_resid[l] first.
_RESUME: ContextVar[tuple] = ContextVar("sae4scfm_resume", default=())


@contextmanager
def resuming(hook_resid: nn.ModuleList, layer: int, h: torch.Tensor) -> Iterator[None]:
    """Within the context (this thread only), forwards of the model owning ``hook_resid`` start at ``layer``
    from ``h``."""
    token = _RESUME.set((hook_resid, int(layer), h))
    try:
        yield
    finally:
        _RESUME.reset(token)


def resume_point(hook_resid: nn.ModuleList) -> tuple[int, torch.Tensor | None]:
    """(layer, cached state) a model's forward starts from: (0, None) unless inside ``resuming``."""
    state = _RESUME.get()
    if state and state[0] is hook_resid:
        return state[1], state[2]
    return 0, None
