"""What the trainer optimises: an `Objective` turns (model call, batch, noise generator) into loss terms.

The trainer knows nothing of diffusion: it hands the objective a `denoiser` (the trained module bound to this
step's loop count S; it returns whatever the module returns, e.g. a `TransformerOutput`), a batch on the training
device and the step's noise generator, back-propagates `LossTerms.total` and divides the gradients by the global
`LossTerms.count` once every micro-batch and rank is in. So the update is the gradient of total / count over the
whole global batch, however the batch is split. Optional hooks have no-op defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from loopdlm.data.batches import TokenBatch
from loopdlm.diffusion.masked import NelboHooks, NelboTerms, reads_out_positions

#: The trained module bound to this step's S: (*inputs, **options) -> the module's output.
ModelCall = Callable[..., Any]


@dataclass
class LossTerms:
    """One micro-batch's loss: total (scalar, differentiable) summed over `count` scored units (tokens, rows);
    metrics: further detached sums in the same units, logged as metric / count over the global batch."""

    total: Tensor
    count: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Base of training objectives; subclasses implement `loss` and may override the hooks."""

    def loss(self, denoiser: ModelCall, batch: Any, generator: torch.Generator) -> LossTerms:
        """The loss of `batch` (already on the training device); all randomness from `generator`."""
        raise NotImplementedError

    def validation_scorer(self) -> NelboHooks | None:
        """The NELBO objective (`bound(denoiser, x0, generator, noisable, samples)`) that held-out evaluation
        reports, or None when this objective has no held-out bound."""
        return None

    @property
    def validation_batches(self) -> int | None:
        """Clean validation batches `on_validation` wants (None = train.eval_batches)."""
        return None

    def on_validation(self, denoiser: Callable[..., Tensor], batches: list[TokenBatch],
                      log: Callable[[dict], None]) -> None:
        """Adapt to validation batches after an evaluation (denoiser: tokens -> logits at the step's S)."""

    def state_dict(self) -> dict[str, Any]:
        """What the objective learnt during training, saved with checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""


def model_logits(denoiser: ModelCall) -> Callable[..., Tensor]:
    """The logits view of a LoopedTransformer call: tokens [B, L] -> float [B, L, V], or, when the caller asks for
    `return_loop_logits` (per-loop supervision), every loop's readout stacked: [K, B, L, V]. It reads out
    positions: with `readout_mask` bool [B, L], [N, V] (or [K, N, V]) at those positions only."""

    def logits(tokens: Tensor, **inputs: Any) -> Tensor:
        output = denoiser(tokens, **inputs)
        return torch.stack(output.loop_logits) if output.loop_logits else output.logits

    return reads_out_positions(logits)


class NelboObjective(Objective):
    """A NELBO-style objective on `TokenBatch`es: MDLM, block diffusion, per-loop supervision or the judge's
    next-token NLL (anything with `nelbo(denoiser, x0, generator, noisable) -> NelboTerms`, `bound` and the
    `NelboHooks`)."""

    def __init__(self, scorer: NelboHooks):
        self.scorer = scorer

    def loss(self, denoiser: ModelCall, batch: TokenBatch, generator: torch.Generator) -> LossTerms:
        terms: NelboTerms = self.scorer.nelbo(model_logits(denoiser), batch.x0, generator, batch.noisable)
        return LossTerms(total=terms.nll_sum, count=terms.n_tokens)

    def validation_scorer(self) -> NelboHooks:
        return self.scorer

    @property
    def validation_batches(self) -> int | None:
        return self.scorer.validation_batches

    def on_validation(self, denoiser, batches, log) -> None:
        self.scorer.on_validation(denoiser, batches, log)

    def state_dict(self) -> dict[str, Any]:
        return self.scorer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scorer.load_state_dict(state)


def as_objective(objective: Objective | NelboHooks) -> Objective:
    """`objective` itself, or a NELBO objective (e.g. `MaskedDiffusion`) wrapped in `NelboObjective`."""
    return objective if isinstance(objective, Objective) else NelboObjective(objective)


__all__ = ["LossTerms", "ModelCall", "NelboObjective", "Objective", "as_objective", "model_logits"]
