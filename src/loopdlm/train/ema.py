"""Exponential moving average of model weights, kept beside the live parameters (sharded alike under FSDP)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


class EMA:
    """Shadow weights updated after every optimizer step as ema <- decay * ema + (1 - decay) * param.

    The shadow tensors have the same shapes, dtypes, devices (and DTensor placements) as the parameters they
    follow, so the same code serves single-device, DDP and FSDP training.
    """

    def __init__(self, params: Sequence[Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Sequence[Tensor]) -> None:
        """Move every shadow tensor a fraction (1 - decay) of the way towards its parameter."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_from(self, params: Sequence[Tensor]) -> None:
        """Reset the shadow to the given parameter values (after loading weights)."""
        for shadow, param in zip(self.shadow, params, strict=True):
            shadow.copy_(param.detach())

    @contextlib.contextmanager
    def swapped_into(self, params: Sequence[Tensor]) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights; on exit the live weights are back, bit for bit."""
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    @torch.no_grad()
    def _swap(self, params: Sequence[Tensor]) -> None:
        # Exchanging in place (one temporary per tensor) keeps the parameter objects, and so any DDP/FSDP
        # bookkeeping that refers to them, untouched.
        for shadow, param in zip(self.shadow, params, strict=True):
            live = param.detach().clone()
            param.detach().copy_(shadow)
            shadow.copy_(live)
