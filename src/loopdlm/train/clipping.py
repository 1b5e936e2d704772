"""Gradient-norm clipping, globally or with the looped core clipped on its own.

The shared core's gradient is the sum of its S per-loop contributions, so its norm grows with the loop count S of
the step. Under one global norm the core then sets the clipping factor of every other parameter too: on large-S
steps the embedding, prelude, coda and head take smaller steps for no reason of their own. Clipping the core and
the rest as two groups (each to the same threshold) keeps the other parameters' updates independent of S while the
core's own step stays bounded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loopdlm.train.distributed import to_local


def clip_groups(model: nn.Module, params: list[Tensor], split_core: bool) -> list[list[Tensor]]:
    """`params` as one group, or as [core parameters, all others] when `split_core` and the model has a core.

    model: the unwrapped `LoopedTransformer` (its `layers` and `config`); params: the trainer's parameter list.
    """
    if not split_core or not model.config.core_layers:
        return [params]
    cfg = model.config
    core = {id(p) for layer in model.layers[cfg.core_start:cfg.core_end] for p in layer.parameters()}
    return [[p for p in params if id(p) in core], [p for p in params if id(p) not in core]]


def clip_gradients(groups: list[list[Tensor]], max_norm: float) -> Tensor:
    """Scale each group's gradients down to total norm <= max_norm; returns the norm of all gradients before
    clipping (a local scalar tensor, the quantity the trainer logs)."""
    norms = [to_local(torch.nn.utils.clip_grad_norm_(group, max_norm, foreach=True)) for group in groups]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
