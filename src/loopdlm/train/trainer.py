"""The training loop: one loop count S per optimizer step, gradient accumulation, EMA, callbacks, checkpoints.

The `Trainer` runs any `Objective` (train/objective.py) on any module: a `LoopedTransformer` (MDLM, block diffusion,
per-loop supervision, the judge's next-token loss, WINO+) or another trainable such as a CoDD prior. Its parts each
have one job: `Checkpointer` saves and restores the stateful parts (train/checkpointing.py), `MetricsLog` writes
metrics.jsonl (train/metrics.py), and callbacks evaluate and stop early (train/callbacks.py).

Randomness is a function of (seed, step) so that every rank agrees without communication and a resumed run
repeats an uninterrupted one exactly:
  * S for update `step` is `loops_for_step(seed, step, max_loops, ...)` (the same on every rank), drawn from
    `train.loop_distribution` (see `train/loop_counts.py`); a module without a looped core runs S = 1.
  * The noise of each micro-batch comes from a device generator re-seeded from (seed, step, shard), where
    shard = micro_index * world_size + rank numbers the per-rank micro-batches of the step in the order the
    data sources hand out global-batch rows. Hence a run's trajectory depends on the micro-batch size and the
    number of rows per update, not on how those micro-batches are spread over ranks and accumulation steps
    (2 ranks x batch 4 equals 1 rank x batch 4 x grad_accum 2).
  * The loss is the count-weighted mean over the whole global batch: micro-batches back-propagate their loss
    *sums* (`LossTerms.total`), and the gradients are divided by the global count once all are in.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from loopdlm.config import RunConfig
from loopdlm.data.batches import BatchSource, TensorBatchSource
from loopdlm.data.tokenizers import Tokenizer
from loopdlm.diffusion.masked import NelboHooks
from loopdlm.errors import UserError, os_error_text
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.train.callbacks import Callback, Validation
from loopdlm.train.checkpointing import Checkpointer, GlobalRNG, RunCounters
from loopdlm.train.clipping import clip_gradients, clip_groups
from loopdlm.train.distributed import (
    DistInfo,
    all_reduce_sum,
    compile_blocks,
    gradient_sync,
    on_main_rank,
    setup_distributed,
    wrap_model,
)
from loopdlm.train.ema import EMA
from loopdlm.train.graceful_stop import GracefulStop, TrainingStopped
from loopdlm.train.loop_counts import loops_for_step
from loopdlm.train.lr import learning_rate
from loopdlm.train.metrics import METRICS_FILE, MetricsLog, ProgressLines, format_validation
from loopdlm.train.objective import ModelCall, Objective, as_objective
from loopdlm.train.run_lock import RunLock

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `Trainer.fit` did: the last step reached, (step, loss, loop count S) for every update run in this call
    (the loss in the objective's unit, e.g. nats/token), a record per update (`records`: loss, loops, lr,
    grad_norm and the objective's further metrics, e.g. WINO+'s three terms), the last evaluation ({S: {"nats_per_token", "bits_per_token", "ppl_bound"}}), and the
    newest checkpoint folder (None when none was written or resumed from)."""

    step: int
    history: list[tuple[int, float, int]] = field(default_factory=list)
    records: list[dict[str, float]] = field(default_factory=list)
    eval_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoint: Path | None = None


def derived_seed(*parts: object) -> int:
    """A 63-bit generator seed that is a fixed function of `parts`; unrelated for neighbouring inputs."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Trainer:
    """Trains a module on an objective; resumable, single- or multi-process.

    Args:
        config: the run's settings (`config.train` drives the loop; `config.sample.eval_loops` the evaluation).
            For a `LoopedTransformer`, `config.model` must have its architecture (it is saved with checkpoints);
            its max_loops is the S_max training draws from.
        model: the trained module; moved to the training device and wrapped for data parallelism here.
        objective: an `Objective`, or a NELBO objective such as `MaskedDiffusion` (wrapped in `NelboObjective`).
        train_source / val_source: this rank's batch streams (see `BatchSource`); no val_source, no evaluation
            (a val_source needs an objective with a held-out bound).
        out_dir: run folder for metrics.jsonl and checkpoints/ (default: config.train.out_dir); locked while
            `fit` runs, so a second trainer on the same folder is refused. None: train in memory only (no
            checkpoints, no metrics file, no resume).
        tokenizer: saved with each checkpoint; a resume or `train.init_from` whose checkpoint holds a tokenizer
            with other contents (its hash differs, even at the same vocabulary size) is refused.
        dist: this process's place in the process group (default: `setup_distributed(config.train.device)`).
        resume: None = continue from out_dir's latest checkpoint when there is one; True = require one;
            False = start fresh (refused when out_dir already holds checkpoints).
        callbacks: further `Callback`s (e.g. `EarlyStopping`), run after the validation.
    """

    def __init__(self, config: RunConfig, model: nn.Module, objective: Objective | NelboHooks,
                 train_source: BatchSource, val_source: BatchSource | None = None,
                 out_dir: str | Path | None = "", tokenizer: Tokenizer | None = None, *,
                 dist: DistInfo | None = None, resume: bool | None = None, callbacks: Sequence[Callback] = ()):
        train = config.train
        config.validate()
        looped_model = isinstance(model, LoopedTransformer)
        if looped_model and config.model.architecture() != model.config.architecture():
            raise ValueError("config.model must describe the model being trained (it is saved with checkpoints)")
        self.config, self.objective = config, as_objective(objective)
        self.train_source = train_source
        self.out_dir = None if out_dir is None else Path(out_dir or train.out_dir)
        self.tokenizer, self.resume = tokenizer, resume
        self.dist = dist if dist is not None else setup_distributed(train.device)
        self.device = self.dist.device
        self.autocast_dtype = _autocast_dtype(train.precision, self.device)

        self.model = model.to(self.device)
        if looped_model:
            self.model.checkpoint_loops = train.checkpoint_loops
            if train.compile:
                compile_blocks(self.model)
        self.wrapped = wrap_model(self.model, self.dist, train.distributed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # after wrapping (FSDP shards)
        self.optimizer = _adamw(self.params, config, self.device)
        self.clip_groups = clip_groups(self.model, self.params, train.clip_core_separately and looped_model)
        self.ema = EMA(self.params, train.ema_decay) if train.ema_decay > 0 else None

        looped = looped_model and model.config.core_layers > 0
        self.looped_model = looped_model
        self.max_loops = config.model.max_loops if looped else 1  # training's S_max is the run's
        self.last_record: dict[str, float] = {}
        self.noise = torch.Generator(device=self.device)
        self.counters = RunCounters()
        self.checkpointer = Checkpointer(
            self.out_dir, config, self.dist, self.model, self.ema, self.optimizer, self.counters,
            {"data": train_source, "rng": GlobalRNG(self.device), "objective": self.objective},
            tokenizer) if self.out_dir is not None else None
        self.metrics = MetricsLog(self.out_dir, self.dist.is_main,
                                  self.checkpointer.kept_note if self.checkpointer else lambda: "")
        self.validation = None
        if val_source is not None:
            scorer = self.objective.validation_scorer()
            if scorer is None:
                raise ValueError(f"{type(self.objective).__name__} has no held-out bound to validate with")
            self.validation = Validation(val_source, scorer,
                                         sorted(set(config.sample.eval_loops)) if looped else [1])
        self.callbacks = [*([self.validation] if self.validation else []), *callbacks]
        self._restored = False

    @property
    def step(self) -> int:
        """Updates done so far."""
        return self.counters.step

    @property
    def checkpoint(self) -> Path | None:
        """The newest checkpoint written or resumed from."""
        return self.checkpointer.latest if self.checkpointer else None

    # ----------------------------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train until `config.train.steps` updates (resuming first when a checkpoint says so), running the
        callbacks (evaluation every eval_every steps and at the end) and checkpointing every ckpt_every steps and
        at the end; a callback may end the run early (with a checkpoint).

        Holds the run folder's lock throughout. The first SIGINT/SIGTERM ends the run after the current step with
        a checkpoint and raises `TrainingStopped` (a KeyboardInterrupt); see `graceful_stop`.
        """
        with contextlib.ExitStack() as held:
            if self.out_dir is not None:
                on_main_rank(self.dist, lambda: self._claim_run_folder(held))
            stop = held.enter_context(GracefulStop())
            return self._fit(stop)

    def _claim_run_folder(self, held: contextlib.ExitStack) -> None:
        """Create out_dir and take its lock for as long as `held` lasts (rank 0)."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"train.out_dir {self.out_dir} is a file, not a folder")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(self.out_dir))
        except OSError as err:
            raise UserError(f"cannot use {self.out_dir} as the run folder: {os_error_text(err)}") from None

    def _restore(self) -> None:
        if self.checkpointer is None:
            return
        if self.checkpointer.restore(self.resume):
            self.metrics.truncate(self.step)
        else:
            self.metrics.start_fresh()

    def _fit(self, stop: GracefulStop) -> TrainResult:
        train = self.config.train
        if not self._restored:
            self._restore()
            self._restored = True
        result = TrainResult(step=self.step, checkpoint=self.checkpoint)
        if self.step >= train.steps:
            return result
        session_start = time.perf_counter() - self.counters.elapsed
        progress = ProgressLines(self.dist.is_main, train.steps)
        progress.start(self.step)
        for callback in self.callbacks:
            callback.on_fit_start(self)
        window = (0.0, 0, 0.0)  # training seconds, tokens, FLOPs since the last log record
        bar = tqdm(total=train.steps, initial=self.step, disable=not progress.bar_shown, dynamic_ncols=True)
        try:
            while self.step < train.steps:
                started = time.perf_counter()
                stats = self._train_step(self.step + 1, stop_requested=stop.requested is not None)
                seconds = time.perf_counter() - started
                counters = self.counters
                counters.step += 1
                counters.elapsed = time.perf_counter() - session_start
                counters.tokens += stats["tokens"]
                counters.flops += stats["flops"]
                window = (window[0] + seconds, window[1] + stats["tokens"], window[2] + stats["flops"])
                result.history.append((self.step, stats["loss"], stats["loops"]))
                result.records.append({"loss": stats["loss"], **stats["terms"], "loops": stats["loops"],
                                       "lr": stats["lr"], "grad_norm": float(stats["grad_norm"])})
                self.last_record = result.records[-1]
                bar.update(1)
                last = self.step == train.steps
                if _due(self.step, train.log_every, last):
                    self._log_train(stats, window, progress)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", S=stats["loops"])
                    window = (0.0, 0, 0.0)
                elif progress.due(self.step):
                    progress.line(self.step, stats)
                stopping = False
                for callback in self.callbacks:
                    stopping |= callback.on_step_end(self, last)
                if self.validation is not None and self.validation.results:
                    result.eval_metrics = self.validation.results
                if self.checkpointer and (_due(self.step, train.ckpt_every, last) or stats["stop"] or stopping):
                    self.checkpointer.save()
                if stats["stop"] and not last:
                    signum = stop.requested or signal.SIGTERM
                    where = self.checkpoint or self.out_dir
                    raise TrainingStopped(f"stopped by {signum.name} after step {self.step}; checkpoint saved in "
                                          f"{where}; run the same command to resume", signum)
                if stopping:
                    break
        finally:
            bar.close()
        for callback in self.callbacks:
            callback.on_fit_end(self)
        result.step, result.checkpoint = self.step, self.checkpoint
        return result

    def _train_step(self, step: int, stop_requested: bool = False) -> dict[str, Any]:
        """One optimizer update (number `step`, 1-based) over grad_accum micro-batches with a single S.
        `stop_requested` (this rank got a signal) is summed over ranks with the losses, so that every rank sees
        the same "stop" after the same step."""
        train = self.config.train
        loops = self.loops_at(step)
        lr = learning_rate(step, train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        flops = 0.0

        def count_flops(tokens: Tensor, readouts: int, readout_fraction: float) -> None:
            nonlocal flops
            flops += self.model.flops_per_token(tokens.shape[1], loops, True, readouts,
                                                readout_fraction) * tokens.numel()

        denoiser = self._model_call(loops, count_flops)
        # loss sum, count, data tokens, FLOPs, stop requests, then the objective's metric sums: summed over
        # micro-batches, then over ranks.
        totals: Tensor | None = None
        names: list[str] = []
        for micro in range(train.grad_accum):
            batch = self.train_source.next_batch().to(self.device)
            shard = micro * self.dist.world_size + self.dist.rank
            self.noise.manual_seed(derived_seed("noise", train.seed, step, shard))
            with gradient_sync(self.wrapped, enabled=micro == train.grad_accum - 1):
                with self.autocast():
                    terms = self.objective.loss(denoiser, batch, self.noise)
                terms.total.backward()
            if totals is None:
                names = sorted(terms.metrics)
                totals = torch.zeros(5 + len(names), dtype=torch.float64, device=self.device)
            totals[0] += terms.total.detach().double()
            totals[1] += terms.count.detach().double()
            totals[2] += batch.num_tokens
            for index, name in enumerate(names):
                totals[5 + index] += terms.metrics[name].detach().double()
        totals[3] = flops
        totals[4] = float(stop_requested)
        all_reduce_sum(totals, self.dist)
        # Data parallelism averages gradients over ranks; undo that and divide by the global count, so the update
        # is the gradient of the count-weighted mean loss of the whole global batch.
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_mul_(grads, (self.dist.world_size / totals[1].clamp(min=1)).float())
        max_norm = train.grad_clip if train.grad_clip > 0 else math.inf
        grad_norm = clip_gradients(self.clip_groups, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.params)
        values = totals.tolist()
        loss_sum, count, tokens, flops, stops = values[:5]
        count = max(count, 1.0)
        return {"loss": loss_sum / count, "loops": loops, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens),
                "flops": flops, "stop": stops > 0,
                "terms": {name: value / count for name, value in zip(names, values[5:])}}

    def _model_call(self, loops: int, count_flops: Callable[[Tensor, int, float], None]) -> ModelCall:
        """The wrapped module as the objective calls it this step: a LoopedTransformer at S = `loops` (its FLOPs
        counted from what it actually runs: an objective may feed longer rows than x0, e.g. block diffusion's
        [x_t ; x_0], ask for every loop's readout, or read out only some positions); any other module as it is."""
        if not self.looped_model:
            return self.wrapped

        def denoiser(tokens: Tensor, **inputs: Any):
            readout_mask = inputs.get("readout_mask")
            fraction = 1.0 if readout_mask is None else float(readout_mask.sum()) / readout_mask.numel()
            count_flops(tokens, loops - 1 if inputs.get("return_loop_logits") else 0, fraction)
            return self.wrapped(tokens, loops=loops, **inputs)

        return denoiser

    # ---------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[int, dict[str, float]]:
        """Validation NELBO with the EMA weights at every evaluation loop count S (see `Validation.evaluate`);
        {} without a validation source."""
        return self.validation.evaluate(self) if self.validation is not None else {}

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (every rank must call it); returns its folder on rank 0."""
        return self.checkpointer.save() if self.checkpointer else None

    # ------------------------------------------------------------------------------------------------- helpers
    def loops_at(self, step: int) -> int:
        """The loop count S of update `step` (1 for a module without a looped core)."""
        train = self.config.train
        return loops_for_step(train.seed, step, self.max_loops, train.loop_distribution, train.loop_curriculum_steps)

    def eval_seed(self) -> int:
        """The validation noise seed of this rank (rank 0's is `loopdlm eval`'s)."""
        return derived_seed("eval", self.config.train.seed, self.dist.rank)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def ema_weights(self):
        """Context in which the model holds its EMA weights (the live ones without EMA)."""
        return self.ema.swapped_into(self.params) if self.ema is not None else contextlib.nullcontext()

    def _log_train(self, stats: dict[str, Any], window: tuple[float, int, float], progress: ProgressLines) -> None:
        seconds, tokens, flops = window
        counters = self.counters
        record = {"split": "train", "step": self.step, "loss": stats["loss"], **stats["terms"], "lr": stats["lr"],
                  "loops": stats["loops"], "grad_norm": float(stats["grad_norm"]), "tokens": counters.tokens,
                  "flops": counters.flops, "tokens_per_s": tokens / max(seconds, 1e-9),
                  "flops_per_s": flops / max(seconds, 1e-9), "elapsed": counters.elapsed}
        self.metrics.write(record)
        progress.line(self.step, stats, f" {record['tokens_per_s']:.0f} tokens/s")


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for 'bf16', and for 'auto' on a CUDA device that supports it; None = plain fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _adamw(params: list[Tensor], config: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are left alone); fused kernels on CUDA."""
    train = config.train
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=fused or None,
                             foreach=None if fused else True)


__all__ = ["METRICS_FILE", "BatchSource", "TensorBatchSource", "TrainResult", "Trainer", "derived_seed",
           "format_validation"]
