"""Trainer callbacks: held-out evaluation (with the objective's validation hook) and early stopping.

A callback sees the trainer after every update (`on_step_end`, which may ask the run to stop) and when `fit` ends
(`on_fit_end`); `on_fit_start` runs before the first update of a session.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from loopdlm.data.batches import BatchSource
from loopdlm.diffusion.masked import reads_out_positions
from loopdlm.errors import UserError
from loopdlm.eval.likelihood import likelihood_bound
from loopdlm.train.distributed import DistInfo, all_gather_objects, all_reduce_sum, reshard
from loopdlm.train.metrics import format_validation

if TYPE_CHECKING:
    from loopdlm.train.trainer import Trainer

logger = logging.getLogger(__name__)


class Callback:
    """Hooks into `Trainer.fit`; every method is a no-op by default."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before this session's first update."""

    def on_step_end(self, trainer: Trainer, last: bool) -> bool:
        """After update `trainer.step` (`last`: the run's final one); True asks the run to stop here."""
        return False

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the session's last update (also after an early stop)."""


class Validation(Callback):
    """The held-out NELBO every `train.eval_every` updates and at the end, with the EMA weights, at every
    evaluation loop count S (`eval/likelihood.py`, seeded as `loopdlm eval`); then the objective's
    `on_validation` hook (block diffusion's noise-interval search) with the live weights at the step's S.

    Each S sees the same `train.eval_batches` batches (the source is rewound) and the same noise, so values compare
    across evaluations and across S. Results go to metrics.jsonl (split "val"; the hook's records as "schedule").
    """

    def __init__(self, source: BatchSource, scorer: Any, eval_loops: list[int]):
        self.source, self.scorer, self.eval_loops = source, scorer, eval_loops
        self.start = source.state_dict()
        self.results: dict[int, dict[str, float]] = {}

    def on_step_end(self, trainer: Trainer, last: bool) -> bool:
        every = trainer.config.train.eval_every
        if last or (every > 0 and trainer.step % every == 0):
            self.results = self.evaluate(trainer)
            for loops, values in self.results.items():
                trainer.metrics.write({"split": "val", "step": trainer.step, "loops": loops, **values,
                                       "tokens": trainer.counters.tokens, "flops": trainer.counters.flops,
                                       "elapsed": trainer.counters.elapsed})
                if trainer.dist.is_main:
                    logger.info("step %d val S=%d: %s", trainer.step, loops, format_validation(values))
            self.adapt_objective(trainer)
        return False

    def batches(self, count: int) -> list:
        """The first `count` validation batches (the same ones every time)."""
        self.source.load_state_dict(self.start)
        return [self.source.next_batch() for _ in range(count)]

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict[int, dict[str, float]]:
        """{S: {"nats_per_token", "bits_per_token", "ppl_bound" (= exp(nats)), "scored_tokens", and
        "bits_per_char" when the validation source knows its characters per token}}."""
        train = trainer.config.train
        characters_per_token = getattr(self.source, "characters_per_token", None)
        batches = self.batches(train.eval_batches)
        results = {}
        with trainer.ema_weights():
            for loops in self.eval_loops:
                report = likelihood_bound(trainer.model, self.scorer, batches, loops, train.eval_samples,
                                          trainer.eval_seed(), characters_per_token,
                                          autocast_dtype=trainer.autocast_dtype,
                                          reduce=lambda sums: all_reduce_sum(sums, trainer.dist))
                nats = report.nats_per_token
                results[loops] = {"nats_per_token": nats, "bits_per_token": nats / math.log(2),
                                  "ppl_bound": math.exp(min(nats, 700.0)), "scored_tokens": report.tokens}
                if characters_per_token:
                    results[loops]["bits_per_char"] = report.bits_per_char
            reshard(trainer.model)
        return results

    @torch.no_grad()
    def adapt_objective(self, trainer: Trainer) -> None:
        """Let the objective tune itself on validation batches with the live weights at the S of the current
        step; every choice goes to metrics.jsonl."""
        objective = trainer.objective
        batches = [batch.to(trainer.device) for batch in
                   self.batches(objective.validation_batches or trainer.config.train.eval_batches)]
        loops = trainer.loops_at(trainer.step)

        @reads_out_positions
        def denoiser(tokens: Tensor, **inputs: Any) -> Tensor:
            return trainer.model(tokens, loops=loops, **inputs).logits

        trainer.model.eval()
        try:
            with trainer.autocast():
                objective.on_validation(denoiser, batches, lambda record: trainer.metrics.write(
                    {"split": "schedule", "step": trainer.step, **record}))
            reshard(trainer.model)
        finally:
            trainer.model.train()


@dataclass
class EarlyStopping(Callback):
    """Model selection on a held-out score: `score(model) -> float`, higher is better (e.g. threshold-decoding
    accuracy on held-out training-split prompts), evaluated before the first update and after every `every`
    updates (and after the last); the weights with the best score (the earliest of ties, so the starting weights
    win a tie) are loaded back when the run ends.
    patience: stop after this many evaluations in a row without improvement (0 = run every step).
    `scores` holds (step, score) in order and `best_step` the step whose weights were kept. Its memory of the best
    weights lives in this process: a resumed run starts selecting afresh. Under torchrun every rank scores its
    replica and all follow rank 0's score, so they keep the same weights and stop at the same step.
    """

    score: Callable[[nn.Module], float]
    every: int
    patience: int = 0
    scores: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    _best_state: dict[str, Tensor] | None = field(default=None, repr=False)
    _since_best: int = 0

    def __post_init__(self):
        if self.every < 1:
            raise UserError(f"early stopping needs every >= 1, got {self.every}")

    def on_fit_start(self, trainer: Trainer) -> None:
        self.check(trainer.model, trainer.step, trainer.dist)

    def on_step_end(self, trainer: Trainer, last: bool) -> bool:
        if last or trainer.step % self.every == 0:
            return self.check(trainer.model, trainer.step, trainer.dist)
        return False

    def on_fit_end(self, trainer: Trainer) -> None:
        self.restore(trainer.model)

    def check(self, model: nn.Module, step: int, dist: DistInfo | None = None) -> bool:
        """Score `model` (in eval mode, its mode restored after) at `step`, keeping a copy of its weights when they
        are the best so far. Returns True when `patience` evaluations in a row brought no improvement. With `dist`,
        rank 0's score counts on every rank: a score that differs by a hair between devices must not make one
        rank stop while the others wait for it."""
        was_training = model.training
        model.eval()
        score = float(self.score(model))
        model.train(was_training)
        if dist is not None:
            score = all_gather_objects(score, dist)[0]
        if self._best_state is None or score > max(s for _, s in self.scores):
            self.best_step, self._best_state, self._since_best = step, copy.deepcopy(model.state_dict()), 0
        else:
            self._since_best += 1
        self.scores.append((step, score))
        return self.patience > 0 and self._since_best >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best weights seen by `check` into `model`."""
        if self._best_state is None:
            raise UserError("early stopping has not scored any weights yet")
        model.load_state_dict(self._best_state)


__all__ = ["Callback", "EarlyStopping", "Validation"]
