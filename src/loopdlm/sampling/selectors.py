"""Selectors: which masked slots the shared loop commits each step.

Each selector works on window-local tensors of a `StepContext` and returns a `Decision`; none of them calls the
model, so any selector combines with any denoiser (looped, KV-cached) and any logit transform (CoDD).
"""

from __future__ import annotations

import torch
from torch import Tensor

from loopdlm.diffusion.schedules import LogLinear, Schedule
from loopdlm.sampling.engine import Decision, StepContext


def top_k_mask(scores: Tensor, k: Tensor, selectable: Tensor) -> Tensor:
    """The k highest-scoring selectable slots of each row.

    scores float [B, W]; k int64 [B] (clipped to the selectable count); selectable bool [B, W] -> bool [B, W].
    """
    scores = scores.masked_fill(~selectable, float("-inf"))
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                            .expand_as(order).contiguous())
    return (ranks < k[:, None]) & selectable


def even_split(total: Tensor, steps: int, step: int) -> Tensor:
    """How many of `total` [B] items to take at `step` (0-based, < steps) when spread evenly over `steps`;
    earlier steps get the remainder, as in LLaDA."""
    base, remainder = total // steps, total % steps
    return base + (step < remainder).long()


class AncestralSelector:
    """MDLM ancestral sampling on a T-step time grid from 1 to 0: a masked slot at step t -> s is committed with
    probability (alpha_s - alpha_t) / (1 - alpha_t); the last step reaches s = 0 and commits everything left (so
    no slot is ever left masked or turned into an arbitrary id)."""

    def __init__(self, steps: int, schedule: Schedule | None = None):
        if steps < 1:
            raise ValueError("steps must be >= 1")
        self.steps = steps
        self.schedule = schedule or LogLinear(eps=0.0)

    def start_window(self, masked_counts: Tensor) -> None:
        pass

    def select(self, ctx: StepContext) -> Decision:
        k = min(ctx.step, self.steps - 1)
        t = torch.tensor(1 - k / self.steps, dtype=torch.float64)
        s = torch.tensor(1 - (k + 1) / self.steps, dtype=torch.float64)
        alpha_t, alpha_s = self.schedule.alpha(t), self.schedule.alpha(s)
        p_commit = float((alpha_s - alpha_t) / (1 - alpha_t)) if k < self.steps - 1 else 1.0
        draw = torch.rand(ctx.selectable.shape, generator=ctx.generator, device=ctx.selectable.device,
                          dtype=torch.float64)
        return Decision(commit=(draw < p_commit) & ctx.selectable)


class FixedScheduleSelector:
    """Commit a fixed number of slots per step (the window's masks split evenly over `steps`), choosing the most
    confident ('confidence', LLaDA low-confidence remasking) or random ('random') ones. Committed slots stay."""

    def __init__(self, steps: int, order: str = "confidence"):
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if order not in ("confidence", "random"):
            raise ValueError(f"order must be 'confidence' or 'random', got {order!r}")
        self.steps = steps
        self.order = order
        self._masked_at_start: Tensor | None = None

    def start_window(self, masked_counts: Tensor) -> None:
        self._masked_at_start = masked_counts

    def select(self, ctx: StepContext) -> Decision:
        if ctx.step >= self.steps - 1:  # the last step (and any past it) commits whatever is left
            quota = ctx.selectable.sum(dim=1)
        else:
            quota = even_split(self._masked_at_start, self.steps, ctx.step)
        if self.order == "confidence":
            scores = ctx.confidence.double()
        else:
            scores = torch.rand(ctx.confidence.shape, generator=ctx.generator, device=ctx.confidence.device,
                                dtype=torch.float64)
        return Decision(commit=top_k_mask(scores, quota, ctx.selectable))


class ThresholdSelector:
    """Fast-dLLM threshold rule: commit every masked slot whose confidence is >= tau, and at least the single
    most confident slot of each row that still has masks."""

    def __init__(self, threshold: float = 0.9):
        self.threshold = threshold

    def start_window(self, masked_counts: Tensor) -> None:
        pass

    def select(self, ctx: StepContext) -> Decision:
        sure = (ctx.confidence >= self.threshold) & ctx.selectable
        best = top_k_mask(ctx.confidence.double(), torch.ones_like(ctx.selectable[:, 0], dtype=torch.long),
                          ctx.selectable)
        return Decision(commit=sure | best)
