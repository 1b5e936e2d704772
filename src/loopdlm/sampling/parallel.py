"""Adaptive parallel-decoding selectors: how many slots to commit is decided each step from the model's certainty.

* `FactorSelector` (Fast-dLLM factor rule): sort the masked slots by confidence c_(1) >= c_(2) >= ... and commit the
  longest prefix whose every member satisfies (n + 1)(1 - c_(n)) <= f (n 1-based), always at least one.
* `EntropyBoundedSelector` (EB-sampler): sort the masked slots by entropy H_(1) <= H_(2) <= ... and commit the
  longest prefix U with sum(H_U) - max(H_U) <= gamma, always at least one.

Both only read a `StepContext`, so they combine with any denoiser (looped, KV-cached, WINO) and logit transform.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loopdlm.sampling.engine import Decision, StepContext
from loopdlm.sampling.selectors import top_k_mask


def factor_commit_count(confidence: Tensor, selectable: Tensor, factor: float) -> Tensor:
    """Fast-dLLM factor rule: how many of the most confident selectable slots to commit.

    The n-th most confident slot (1-based) passes when (n + 1)(1 - c_(n)) <= factor; because c_(n) falls and n rises
    with n, the passing slots form a prefix, and its length is returned (at least 1 where a row has a selectable
    slot, 0 where it has none). Computed in float64 so a value on the boundary is judged exactly.

    Note: the reference (NVlabs/Fast-dLLM `get_transfer_index_dynamic`) also commits every slot when only the
    last one fails; this implements the rule as stated instead.

    Args:
        confidence: float [B, W], probability of each slot's candidate.
        selectable: bool [B, W], masked slots that may be committed.
        factor: f > 0.
    Returns:
        int64 [B].
    """
    scores = confidence.double().masked_fill(~selectable, float("-inf"))
    sorted_conf = scores.sort(dim=1, descending=True).values
    rank = torch.arange(1, scores.shape[1] + 1, device=scores.device, dtype=torch.float64)
    passes = ((rank + 1) * (1 - sorted_conf) <= factor) & sorted_conf.isfinite()
    prefix = passes.long().cumprod(dim=1).sum(dim=1)
    return torch.minimum(prefix.clamp(min=1), selectable.sum(dim=1))


def entropy_bounded_commit_count(entropy: Tensor, selectable: Tensor, gamma: float) -> Tensor:
    """EB-sampler rule: how many of the lowest-entropy selectable slots to commit.

    The longest prefix U of the slots sorted by increasing entropy with sum(H_U) - max(H_U) <= gamma; max(H_U) is
    the prefix's last (largest) entropy, so the first slot always qualifies and gamma = 0 commits one slot a step
    (more only when several have zero entropy).

    Args:
        entropy: float [B, W], entropy (nats) of each slot's predictive distribution.
        selectable: bool [B, W].
        gamma: entropy budget >= 0 (nats).
    Returns:
        int64 [B]: at least 1 where a row has a selectable slot, 0 where it has none.
    """
    sorted_entropy = entropy.double().masked_fill(~selectable, float("inf")).sort(dim=1).values
    finite = sorted_entropy.isfinite()
    cumulative = torch.where(finite, sorted_entropy, 0.0).cumsum(dim=1)
    within_budget = (cumulative - sorted_entropy <= gamma) & finite
    prefix = within_budget.long().cumprod(dim=1).sum(dim=1)
    return torch.minimum(prefix.clamp(min=1), selectable.sum(dim=1))


def predictive_entropy(log_probs: Tensor) -> Tensor:
    """Entropy in nats of each position's distribution: log_probs float [..., V] (may hold -inf) -> float [...].

    Differentiable with finite gradients also where a probability is 0 (e.g. the mask token under SUBS).
    """
    probs = log_probs.exp()
    # Zeroing log p (not p * log p) where p = 0 keeps 0 * -inf out of the backward pass.
    finite_log = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    return -(probs * finite_log).sum(dim=-1)


class FactorSelector:
    """Fast-dLLM factor rule on the shared loop (see `factor_commit_count`); committed slots stay committed."""

    def __init__(self, factor: float = 1.0):
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.factor = factor

    def start_window(self, masked_counts: Tensor) -> None:
        pass

    def select(self, ctx: StepContext) -> Decision:
        scores = ctx.confidence.double()
        count = factor_commit_count(scores, ctx.selectable, self.factor)
        return Decision(commit=top_k_mask(scores, count, ctx.selectable))


class EntropyBoundedSelector:
    """EB-sampler on the shared loop (see `entropy_bounded_commit_count`). Entropy is that of the distribution the
    candidates were drawn from (after logit transforms, before temperature)."""

    def __init__(self, gamma: float = 0.1):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def start_window(self, masked_counts: Tensor) -> None:
        pass

    def select(self, ctx: StepContext) -> Decision:
        entropy = predictive_entropy(ctx.log_probs.double())
        count = entropy_bounded_commit_count(entropy, ctx.selectable, self.gamma)
        return Decision(commit=top_k_mask(-entropy, count, ctx.selectable))
