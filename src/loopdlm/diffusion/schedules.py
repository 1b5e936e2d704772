"""Noise schedules alpha(t): the probability that a token is still clean at diffusion time t in [0, 1]."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from loopdlm.errors import UserError


class Schedule:
    """alpha(t) with alpha(0) = 1 and alpha(1) ~ 0, and the NELBO weight w(t) = -alpha'(t) / (1 - alpha(t))."""

    def alpha(self, t: Tensor) -> Tensor:
        """t: float [...] -> alpha(t), same shape."""
        raise NotImplementedError

    def weight(self, t: Tensor) -> Tensor:
        """t: float [...] -> w(t) = -alpha'(t) / (1 - alpha(t)), same shape."""
        raise NotImplementedError

    def mask_probability(self, t: Tensor) -> Tensor:
        """Probability 1 - alpha(t) that a token is masked at time t."""
        return 1 - self.alpha(t)


class LogLinear(Schedule):
    """1 - alpha(t) = (1 - eps) t, whose weight is exactly 1/t (MDLM's default; eps = 0 is BD3-LM's)."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.eps) * t

    def weight(self, t: Tensor) -> Tensor:
        return 1 / t


class Cosine(Schedule):
    """alpha(t) = cos(pi/2 * (1 - eps) * t); eps keeps alpha(1) > 0."""

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * (1 - self.eps) * t)

    def weight(self, t: Tensor) -> Tensor:
        scale = 0.5 * math.pi * (1 - self.eps)
        return scale * torch.sin(scale * t) / (1 - torch.cos(scale * t))


SCHEDULES = {"loglinear": LogLinear, "cosine": Cosine}


def make_schedule(name: str, eps: float = 1e-3) -> Schedule:
    """Build a schedule by name ('loglinear' or 'cosine')."""
    if name not in SCHEDULES:
        raise UserError(f"unknown noise schedule '{name}'; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](eps)


def stratified_times(n: int, eps: float, generator: torch.Generator | None, device: torch.device | str,
                     low: float = 0.0, high: float = 1.0) -> Tensor:
    """n stratified ('antithetic') times: draw i lies in [i/n, (i+1)/n), then mapped into [low, high] and lifted
    by eps (t <- eps + (1 - eps) t) so that t > 0. Returns float32 [n]."""
    u = (torch.arange(n, device=device) + torch.rand(n, generator=generator, device=device)) / n
    u = low + (high - low) * u
    return eps + (1 - eps) * u
