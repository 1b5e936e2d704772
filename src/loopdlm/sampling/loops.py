"""Loop-count policies for LoopMDM sampling: how many times the core runs at each denoising step.

A policy answers two questions: the maximum S for a step (`loops_for`, which may depend on denoising progress)
and whether iteration may stop early (`exit_rule`, a `LoopExit` the model consults after every loop).
"""

from __future__ import annotations

from torch import Tensor


class FixedLoops:
    """S core applications at every step."""

    def __init__(self, loops: int):
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        self.loops = loops
        self.exit_rule = None

    def loops_for(self, progress: float) -> int:
        """progress in [0, 1] (fraction of the region committed) -> S."""
        return self.loops


class ScheduledLoops:
    """More loops at intermediate mask ratios, where LoopMDM's gains are largest:
    S(r) = round(min + (max - min) * 4 r (1 - r)) with r = 1 - progress the remaining mask ratio."""

    def __init__(self, min_loops: int, max_loops: int):
        if not 1 <= min_loops <= max_loops:
            raise ValueError(f"need 1 <= min_loops <= max_loops, got {min_loops}, {max_loops}")
        self.min_loops, self.max_loops = min_loops, max_loops
        self.exit_rule = None

    def loops_for(self, progress: float) -> int:
        ratio = 1 - progress
        return round(self.min_loops + (self.max_loops - self.min_loops) * 4 * ratio * (1 - ratio))


class ConvergenceExit:
    """Stop iterating the core once the hidden state stops moving: continue while
    ||h_k - h_{k-1}|| / ||h_k|| >= eps, measured per sequence (norm over [L, D]) or per token (norm over D; a
    converged token is frozen but still serves as key/value for the others). eps = 0 never exits early."""

    def __init__(self, eps: float, per_token: bool = False):
        self.eps = eps
        self.per_token = per_token

    def keep_going(self, loop: int, previous: Tensor, current: Tensor) -> Tensor:
        """previous, current float [B, L, D] -> bool [B] (per sequence) or [B, L] (per token)."""
        dims = (-1,) if self.per_token else (-2, -1)
        change = (current - previous).float().norm(dim=dims)
        scale = current.float().norm(dim=dims).clamp_min(1e-12)
        return change / scale >= self.eps


class AdaptiveLoops:
    """Up to `max_loops` per step with a `ConvergenceExit`."""

    def __init__(self, max_loops: int, eps: float, per_token: bool = False):
        if max_loops < 1:
            raise ValueError(f"max_loops must be >= 1, got {max_loops}")
        self.max_loops = max_loops
        self.exit_rule = ConvergenceExit(eps, per_token)

    def loops_for(self, progress: float) -> int:
        return self.max_loops
