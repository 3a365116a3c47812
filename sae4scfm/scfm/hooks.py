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
