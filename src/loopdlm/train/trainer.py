"""The training loop: one loop count S per optimizer step, gradient accumulation, EMA, evaluation, checkpoints.

Randomness is a function of (seed, step) so that every rank agrees without communication and a resumed run
repeats an uninterrupted one exactly:
  * S for update `step` is `loops_for_step(seed, step, max_loops, ...)` (the same on every rank), drawn from
    `train.loop_distribution` (see `train/loop_counts.py`).
  * The noise of each micro-batch comes from a device generator re-seeded from (seed, step, shard), where
    shard = micro_index * world_size + rank numbers the per-rank micro-batches of the step in the order the
    data sources hand out global-batch rows. Hence a run's trajectory depends on the micro-batch size and the
    number of rows per update, not on how those micro-batches are spread over ranks and accumulation steps
    (2 ranks x batch 4 equals 1 rank x batch 4 x grad_accum 2).
  * The loss is the token-weighted mean over the whole global batch: micro-batches back-propagate their NLL
    *sums*, and the gradients are divided by the global number of scored tokens once all are in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from loopdlm.config import RunConfig, TrainConfig
from loopdlm.data.tokenizers import Tokenizer, load_tokenizer
from loopdlm.diffusion.masked import Denoiser, NelboTerms
from loopdlm.errors import UserError, os_error_text
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.train.checkpoint import (
    TOKENIZER_DIR,
    load_checkpoint_config,
    latest_checkpoint,
    read_training_state,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from loopdlm.train.distributed import (
    DistInfo,
    all_reduce_sum,
    compile_blocks,
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    load_full_model_state,
    load_full_optimizer_state,
    on_main_rank,
    reshard,
    setup_distributed,
    wrap_model,
)
from loopdlm.train.clipping import clip_gradients, clip_groups
from loopdlm.train.ema import EMA
from loopdlm.train.graceful_stop import GracefulStop, TrainingStopped
from loopdlm.train.loop_counts import loops_for_step
from loopdlm.eval.likelihood import bits_per_char
from loopdlm.train.lr import learning_rate
from loopdlm.train.run_lock import RunLock

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
#: Without a progress bar (output not a terminal), a progress line at least this often besides the log_every ones.
PROGRESS_SECONDS = 30.0


class BatchSource(Protocol):
    """A resumable stream of this rank's training (or validation) batches."""

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """(x0 int64 [B, L] clean tokens, noisable bool [B, L] or None = every position) on any device."""

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream (plain ints/containers, as torch.load(weights_only=True) accepts)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the following batches equal those the saved source would have given."""


class Objective(Protocol):
    """A diffusion training objective such as `MaskedDiffusion` or `BlockDiffusion`.

    Optional extras the trainer uses when present: `on_validation(denoiser, batches, log)` (e.g. the data-driven
    clipped schedule of block diffusion; batches are (x0, noisable) pairs, `validation_batches` of them when the
    objective has that attribute, else train.eval_batches) and `state_dict()` / `load_state_dict()` (saved with
    checkpoints).
    """

    def nelbo(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None) -> NelboTerms:
        """One Monte-Carlo NELBO sample for the batch x0 int64 [B, L]; see `MaskedDiffusion.nelbo`."""

    def bound(self, denoiser: Denoiser, x0: Tensor, generator: torch.Generator | None = None,
              noisable: Tensor | None = None, samples: int = 1) -> NelboTerms:
        """The reported NELBO (unclipped noise interval), averaged over `samples` draws."""


class TensorBatchSource:
    """In-memory `BatchSource` over fixed sequences, sharded like the corpus sampler.

    Each epoch is a permutation of the rows drawn from (seed, epoch); a global batch is the next
    batch_size * world_size entries of it and rank r takes entries [r * batch_size, (r + 1) * batch_size).
    An epoch's leftover entries (fewer than a global batch) are skipped.
    """

    def __init__(self, tokens: Tensor, noisable: Tensor | None = None, batch_size: int = 8, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        """tokens: int64 [N, L]; noisable: optional bool [N, L] (False = never noised nor scored)."""
        if tokens.dim() != 2 or (noisable is not None and noisable.shape != tokens.shape):
            raise ValueError("tokens must be [N, L] and noisable, when given, the same shape")
        if not 0 <= rank < world_size or batch_size * world_size > tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} rows cannot fill a global batch of {batch_size} x {world_size}")
        self.tokens, self.noisable = tokens, noisable
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.load_state_dict({"epoch": 0, "cursor": 0})

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """This rank's rows of the next global batch: (int64 [B, L], bool [B, L] or None)."""
        global_batch = self.batch_size * self.world_size
        if self.cursor + global_batch > self.tokens.shape[0]:
            self.load_state_dict({"epoch": self.epoch + 1, "cursor": 0})
        start = self.cursor + self.rank * self.batch_size
        rows = self._order[start : start + self.batch_size]
        self.cursor += global_batch
        return self.tokens[rows], None if self.noisable is None else self.noisable[rows]

    def state_dict(self) -> dict[str, int]:
        """{"epoch": int, "cursor": int}: the permutation in use and the position in it."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()`."""
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        generator = torch.Generator().manual_seed(derived_seed("data", self.seed, self.epoch))
        self._order = torch.randperm(self.tokens.shape[0], generator=generator)


@dataclass
class TrainResult:
    """What `Trainer.fit` did: the last step reached, (step, loss in nats/token, loop count S) for every update
    run in this call, the last evaluation ({S: {"nats_per_token", "bits_per_token", "ppl_bound"}}), and the
    newest checkpoint folder (None when none was written or resumed from)."""

    step: int
    history: list[tuple[int, float, int]] = field(default_factory=list)
    eval_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoint: Path | None = None


def derived_seed(*parts: object) -> int:
    """A 63-bit generator seed that is a fixed function of `parts`; unrelated for neighbouring inputs."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Trainer:
    """Trains a `LoopedTransformer` on a diffusion objective; resumable, single- or multi-process.

    Args:
        config: the run's settings (`config.train` drives the loop; `config.sample.eval_loops` the evaluation).
        model: the denoiser; moved to the training device and wrapped for data parallelism here.
        objective: anything with `nelbo(denoiser, x0, generator, noisable) -> NelboTerms`.
        train_source / val_source: this rank's batch streams (see `BatchSource`); no val_source, no evaluation.
        out_dir: run folder for metrics.jsonl and checkpoints/ (default: config.train.out_dir); locked while
            `fit` runs, so a second trainer on the same folder is refused.
        tokenizer: saved with each checkpoint; a resume or `train.init_from` whose checkpoint holds a tokenizer
            with other contents (its hash differs, even at the same vocabulary size) is refused.
        dist: this process's place in the process group (default: `setup_distributed(config.train.device)`).
        resume: None = continue from out_dir's latest checkpoint when there is one; True = require one;
            False = start fresh (refused when out_dir already holds checkpoints).
    """

    def __init__(self, config: RunConfig, model: LoopedTransformer, objective: Objective, train_source: BatchSource,
                 val_source: BatchSource | None = None, out_dir: str | Path | None = None,
                 tokenizer: Tokenizer | None = None, *, dist: DistInfo | None = None,
                 resume: bool | None = None):
        train = config.train
        config.validate()
        if config.model != model.config:
            raise ValueError("config.model must describe the model being trained (it is saved with checkpoints)")
        self.config, self.objective = config, objective
        self.train_source, self.val_source = train_source, val_source
        self.out_dir = Path(out_dir if out_dir is not None else train.out_dir)
        self.tokenizer, self.resume = tokenizer, resume
        self.dist = dist if dist is not None else setup_distributed(train.device)
        self.device = self.dist.device
        self.autocast_dtype = _autocast_dtype(train.precision, self.device)

        self.model = model.to(self.device)
        if train.compile:
            compile_blocks(self.model)
        self.wrapped = wrap_model(self.model, self.dist, train.distributed)
        self.params = list(self.model.parameters())  # after wrapping: FSDP replaces them by sharded ones
        self.optimizer = _adamw(self.params, config, self.device)
        self.clip_groups = clip_groups(self.model, self.params, train.clip_core_separately)
        self.ema = EMA(self.params, train.ema_decay) if train.ema_decay > 0 else None

        looped = model.config.core_layers > 0
        self.max_loops = model.config.max_loops if looped else 1
        self.eval_loops = sorted(set(config.sample.eval_loops)) if looped else [1]
        self.noise = torch.Generator(device=self.device)
        self.val_start = val_source.state_dict() if val_source is not None else None

        self.step, self.tokens, self.flops, self.elapsed = 0, 0, 0.0, 0.0
        self.checkpoint: Path | None = None
        self._restored = False
        self._progress_start = (0.0, 0)  # (time, step) this session's training began at, for the time estimate
        self._last_progress = 0.0

    # ----------------------------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train until `config.train.steps` updates (resuming first when a checkpoint says so), evaluating every
        eval_every steps and at the end, checkpointing every ckpt_every steps and at the end.

        Holds the run folder's lock throughout. The first SIGINT/SIGTERM ends the run after the current step with
        a checkpoint and raises `TrainingStopped` (a KeyboardInterrupt); see `graceful_stop`.
        """
        with contextlib.ExitStack() as held:
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

    def _fit(self, stop: GracefulStop) -> TrainResult:
        train = self.config.train
        if not self._restored:
            self._restore()
            self._restored = True
        result = TrainResult(step=self.step, checkpoint=self.checkpoint)
        if self.step >= train.steps:
            return result
        session_start = time.perf_counter() - self.elapsed
        self._progress_start = (time.perf_counter(), self.step)
        self._last_progress = time.perf_counter()
        window = (0.0, 0, 0.0)  # training seconds, tokens, FLOPs since the last log record
        bar = tqdm(total=train.steps, initial=self.step, disable=not self._progress_bar(), dynamic_ncols=True)
        try:
            while self.step < train.steps:
                started = time.perf_counter()
                stats = self._train_step(self.step + 1, stop_requested=stop.requested is not None)
                seconds = time.perf_counter() - started
                self.step += 1
                self.elapsed = time.perf_counter() - session_start
                self.tokens += stats["tokens"]
                self.flops += stats["flops"]
                window = (window[0] + seconds, window[1] + stats["tokens"], window[2] + stats["flops"])
                result.history.append((self.step, stats["loss"], stats["loops"]))
                bar.update(1)
                last = self.step == train.steps
                if _due(self.step, train.log_every, last):
                    self._log_train(stats, window)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", S=stats["loops"])
                    window = (0.0, 0, 0.0)
                elif self.step == self._progress_start[1] + 1 or \
                        time.perf_counter() - self._last_progress >= PROGRESS_SECONDS:
                    self._log_progress(stats)  # the first step gives a first time estimate
                if self.val_source is not None and _due(self.step, train.eval_every, last):
                    result.eval_metrics = self.evaluate()
                    self._log_eval(result.eval_metrics)
                    self._adapt_objective()
                if _due(self.step, train.ckpt_every, last) or stats["stop"]:
                    self.checkpoint = self.save()
                if stats["stop"] and not last:
                    signum = stop.requested or signal.SIGTERM
                    where = self.checkpoint or self.out_dir
                    raise TrainingStopped(f"stopped by {signum.name} after step {self.step}; checkpoint saved in "
                                          f"{where}; run the same command to resume", signum)
        finally:
            bar.close()
        result.step, result.checkpoint = self.step, self.checkpoint
        return result

    def _train_step(self, step: int, stop_requested: bool = False) -> dict[str, Any]:
        """One optimizer update (number `step`, 1-based) over grad_accum micro-batches with a single S.
        `stop_requested` (this rank got a signal) is summed over ranks with the losses, so that every rank sees
        the same "stop" after the same step."""
        train = self.config.train
        loops = self._loops(step)
        lr = learning_rate(step, train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        flops = 0.0

        def denoiser(tokens: Tensor, **inputs: Any) -> Tensor:
            # FLOPs are counted from what the model actually runs: an objective may feed longer rows than x0
            # (block diffusion runs [x_t ; x_0]).
            nonlocal flops
            readouts = loops - 1 if inputs.get("return_loop_logits") else 0
            flops += self.model.flops_per_token(tokens.shape[1], loops, True, readouts) * tokens.numel()
            output = self.wrapped(tokens, loops=loops, **inputs)
            # Per-loop supervision asks for every loop's readout (return_loop_logits): [K, B, L, V].
            return torch.stack(output.loop_logits) if output.loop_logits else output.logits

        # NLL sum, scored tokens, data tokens, FLOPs, stop requests: summed over micro-batches, then over ranks.
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)
        for micro in range(train.grad_accum):
            x0, noisable = self.train_source.next_batch()
            x0 = x0.to(self.device, non_blocking=True)
            noisable = noisable.to(self.device, non_blocking=True) if noisable is not None else None
            shard = micro * self.dist.world_size + self.dist.rank
            self.noise.manual_seed(derived_seed("noise", train.seed, step, shard))
            with gradient_sync(self.wrapped, enabled=micro == train.grad_accum - 1):
                with self._autocast():
                    terms = self.objective.nelbo(denoiser, x0, generator=self.noise, noisable=noisable)
                terms.nll_sum.backward()
            totals[0] += terms.nll_sum.detach().double()
            totals[1] += terms.n_tokens.detach().double()
            totals[2] += x0.numel()
        totals[3] = flops
        totals[4] = float(stop_requested)
        all_reduce_sum(totals, self.dist)
        # Data parallelism averages gradients over ranks; undo that and divide by the global token count, so
        # the update is the gradient of the token-weighted mean NELBO of the whole global batch.
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_mul_(grads, (self.dist.world_size / totals[1].clamp(min=1)).float())
        max_norm = train.grad_clip if train.grad_clip > 0 else math.inf
        grad_norm = clip_gradients(self.clip_groups, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.params)
        nll, scored, tokens, flops, stops = totals.tolist()
        return {"loss": nll / max(scored, 1.0), "loops": loops, "lr": lr, "grad_norm": grad_norm,
                "tokens": int(tokens), "flops": flops, "stop": stops > 0}

    # ---------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[int, dict[str, float]]:
        """Validation NELBO with the EMA weights at every evaluation loop count S.

        Each S sees the same eval_batches batches (the source is rewound) and the same noise (a generator
        re-seeded from (seed, rank)), eval_samples t-samples per batch, so values compare across evaluations and
        across S. Returns {S: {"nats_per_token", "bits_per_token", "ppl_bound" (= exp(nats)), "scored_tokens",
        and "bits_per_char" when the validation source knows its `characters_per_token`}}.
        """
        if self.val_source is None:
            return {}
        train = self.config.train
        generator = torch.Generator(device=self.device)
        characters_per_token = getattr(self.val_source, "characters_per_token", None)
        results = {}
        self.model.eval()
        try:
            with self._ema_weights():
                for loops in self.eval_loops:
                    self.val_source.load_state_dict(self.val_start)
                    generator.manual_seed(derived_seed("eval", train.seed, self.dist.rank))
                    totals = torch.zeros(2, dtype=torch.float64, device=self.device)

                    def denoiser(tokens: Tensor, loops: int = loops, **inputs: Any) -> Tensor:
                        return self.model(tokens, loops=loops, **inputs).logits

                    for _ in range(train.eval_batches):
                        x0, noisable = self.val_source.next_batch()
                        x0 = x0.to(self.device)
                        noisable = noisable.to(self.device) if noisable is not None else None
                        with self._autocast():
                            terms = self.objective.bound(denoiser, x0, generator, noisable, train.eval_samples)
                        totals += torch.stack((terms.nll_sum.double(), terms.n_tokens.double()))
                    all_reduce_sum(totals, self.dist)
                    nats = (totals[0] / totals[1].clamp(min=1)).item()
                    results[loops] = {"nats_per_token": nats, "bits_per_token": nats / math.log(2),
                                      "ppl_bound": math.exp(min(nats, 700.0)), "scored_tokens": int(totals[1])}
                    if characters_per_token:
                        results[loops]["bits_per_char"] = bits_per_char(nats, characters_per_token)
                reshard(self.model)
        finally:
            self.model.train()
        return results

    @torch.no_grad()
    def _adapt_objective(self) -> None:
        """Let the objective tune itself on validation batches (block diffusion's lowest-variance clipped noise
        interval), with the live weights at the S of the current step; every choice goes to metrics.jsonl."""
        hook = getattr(self.objective, "on_validation", None)
        if hook is None:
            return
        train = self.config.train
        loops = self._loops(self.step)

        def denoiser(tokens: Tensor, **inputs: Any) -> Tensor:
            return self.model(tokens, loops=loops, **inputs).logits

        self.val_source.load_state_dict(self.val_start)
        batches = []
        for _ in range(getattr(self.objective, "validation_batches", train.eval_batches)):
            x0, noisable = self.val_source.next_batch()
            batches.append((x0.to(self.device), noisable.to(self.device) if noisable is not None else None))
        self.model.eval()
        try:
            with self._autocast():
                hook(denoiser, batches, lambda record: self._write_metrics(
                    {"split": "schedule", "step": self.step, **record}))
            reshard(self.model)
        finally:
            self.model.train()

    # --------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (every rank must call it); returns its folder on rank 0."""
        model_state = full_model_state(self.model, self.dist)
        ema_state = None
        if self.ema is not None:
            with self.ema.swapped_into(self.params):
                ema_state = full_model_state(self.model, self.dist)
        optimizer_state = full_optimizer_state(self.model, self.optimizer, self.dist)

        def write() -> Path:
            training_state = {"step": self.step, "tokens": self.tokens, "flops": self.flops,
                              "elapsed": self.elapsed, "optimizer": optimizer_state,
                              "data": self.train_source.state_dict(), "rng": _rng_state(self.device),
                              "objective": _objective_state(self.objective)}
            try:
                return save_checkpoint(self.out_dir, self.step, model_state=model_state, ema_state=ema_state,
                                       training_state=training_state, config=self.config,
                                       tokenizer_saver=self.tokenizer.save if self.tokenizer else None,
                                       keep_last=self.config.train.keep_last)
            except OSError as err:
                kept = f"{self.checkpoint} is still the latest" if self.checkpoint else "no earlier one exists"
                raise UserError(f"cannot write the checkpoint of step {self.step} into {self.out_dir}: "
                                f"{os_error_text(err)}; {kept}") from None

        return on_main_rank(self.dist, write)

    def _restore(self) -> None:
        latest = latest_checkpoint(self.out_dir)
        if self.resume is False and latest is not None:
            raise UserError(f"{self.out_dir} already holds checkpoints; resume from them or use another out_dir")
        if self.resume is True and latest is None:
            raise UserError(f"nothing to resume: no checkpoint in {self.out_dir}")
        if latest is not None:
            self._resume_from(latest)
            return
        if self.dist.is_main:
            _set_aside_metrics(self.out_dir / METRICS_FILE)
        if self.config.train.init_from:
            folder = resolve_checkpoint(self.config.train.init_from)
            self._check_tokenizer(folder, "train.init_from")
            self._load_weights(folder, use_ema=True)
            if self.ema is not None:
                self.ema.copy_from(self.params)
            logger.info("initialised weights from %s", folder)

    def _resume_from(self, folder: Path) -> None:
        saved = load_checkpoint_config(folder)
        if saved.model != self.config.model:
            differing = [k for k, v in vars(saved.model).items() if getattr(self.config.model, k) != v]
            hint = (f": it was trained on data.source={saved.data.source!r} with a {saved.data.tokenizer} "
                    "tokenizer, so another data set or tokenizer lives there" if "vocab_size" in differing else "")
            raise UserError(f"checkpoint {folder} has a different model config ({', '.join(differing)}){hint}; "
                            "use matching settings or set another train.out_dir")
        self._check_tokenizer(folder, "checkpoint")
        state = read_training_state(folder)
        if self.ema is not None:
            self._load_weights(folder, use_ema=True)
            self.ema.copy_from(self.params)
        self._load_weights(folder, use_ema=False)
        try:
            load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.train_source.load_state_dict(state["data"])
            if state.get("objective"):
                self.objective.load_state_dict(state["objective"])
            _set_rng_state(state["rng"], self.device)
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
            self.flops, self.elapsed = float(state["flops"]), float(state["elapsed"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot resume from {folder}: {' '.join(str(err).split())}") from None
        self.checkpoint = folder
        if self.dist.is_main:
            _truncate_metrics(self.out_dir / METRICS_FILE, self.step)
            logger.info("resumed from %s at step %d", folder, self.step)
            _warn_if_schedule_changed(saved.train, self.config.train, self.step)

    def _check_tokenizer(self, folder: Path, origin: str) -> None:
        """UserError when the checkpoint's saved tokenizer differs from this run's (compared by content hash,
        so a corpus with one character swapped is caught at the same vocabulary size)."""
        if self.tokenizer is None or not (folder / TOKENIZER_DIR).is_dir():
            return
        saved = load_tokenizer(folder / TOKENIZER_DIR)
        if saved.fingerprint() != self.tokenizer.fingerprint():
            advice = ("train on the data it was trained on" if origin == "train.init_from" else
                      "train on the original data or set another train.out_dir")
            raise UserError(
                f"{origin} {folder} was trained with a different tokenizer (hash {saved.fingerprint()[:12]}, "
                f"{saved.vocab_size} ids) than this run's (hash {self.tokenizer.fingerprint()[:12]}, "
                f"{self.tokenizer.vocab_size} ids): the corpus or tokenizer settings changed; {advice}")

    def _load_weights(self, folder: Path, use_ema: bool) -> None:
        try:
            load_full_model_state(self.model, read_weights(folder, use_ema))
        except RuntimeError as err:
            raise UserError(f"weights in {folder} do not fit the model: {' '.join(str(err).split())}") from None

    # ------------------------------------------------------------------------------------------------- helpers
    def _loops(self, step: int) -> int:
        train = self.config.train
        return loops_for_step(train.seed, step, self.max_loops, train.loop_distribution, train.loop_curriculum_steps)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _ema_weights(self):
        return self.ema.swapped_into(self.params) if self.ema is not None else contextlib.nullcontext()

    def _progress_bar(self) -> bool:
        return self.dist.is_main and sys.stderr.isatty() and not os.environ.get("CI")

    def _log_train(self, stats: dict[str, Any], window: tuple[float, int, float]) -> None:
        seconds, tokens, flops = window
        record = {"split": "train", "step": self.step, "loss": stats["loss"], "lr": stats["lr"],
                  "loops": stats["loops"], "grad_norm": float(stats["grad_norm"]), "tokens": self.tokens,
                  "flops": self.flops, "tokens_per_s": tokens / max(seconds, 1e-9),
                  "flops_per_s": flops / max(seconds, 1e-9), "elapsed": self.elapsed}
        self._write_metrics(record)
        self._log_progress(stats, f" {record['tokens_per_s']:.0f} tokens/s")

    def _log_progress(self, stats: dict[str, Any], extra: str = "") -> None:
        """Without a progress bar: a line with the step, loss and the estimated time left (from this session's
        pace)."""
        self._last_progress = time.perf_counter()
        if not self.dist.is_main or self._progress_bar():
            return
        started, first_step = self._progress_start
        seconds_per_step = (self._last_progress - started) / max(self.step - first_step, 1)
        left = _duration(seconds_per_step * (self.config.train.steps - self.step))
        logger.info("step %d/%d loss %.4f S=%d lr %.2e%s, about %s left", self.step, self.config.train.steps,
                    stats["loss"], stats["loops"], stats["lr"], extra, left)

    def _log_eval(self, results: dict[int, dict[str, float]]) -> None:
        for loops, values in results.items():
            self._write_metrics({"split": "val", "step": self.step, "loops": loops, **values,
                                 "tokens": self.tokens, "flops": self.flops, "elapsed": self.elapsed})
            if self.dist.is_main:
                logger.info("step %d val S=%d: %s", self.step, loops, format_validation(values))

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        path = self.out_dir / METRICS_FILE
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:
            kept = f"{self.checkpoint} is the latest checkpoint" if self.checkpoint else "no checkpoint was written"
            raise UserError(f"cannot append to {path}: {os_error_text(err)}; {kept}") from None


def format_validation(values: dict[str, Any]) -> str:
    """One validation result as text: nats/token, bits/char (when known), the perplexity bound, tokens scored."""
    per_char = f", {values['bits_per_char']:.4f} bits/char" if "bits_per_char" in values else ""
    return (f"{values['nats_per_token']:.4f} nats/token{per_char}, PPL <= {values['ppl_bound']:.2f} "
            f"({values['scored_tokens']} tokens scored)")


def _objective_state(objective: Objective) -> dict[str, Any]:
    # MDLM has no state; block diffusion remembers its data-driven noise interval.
    return objective.state_dict() if hasattr(objective, "state_dict") else {}


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


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Global RNG states (python, numpy, torch CPU and accelerator) as weights_only-loadable values. Training
    itself draws only from seeded generators; these keep any other consumer reproducible across a resume."""
    version, keys, gauss = random.getstate()
    kind, mt_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss],
             "numpy": [kind, torch.from_numpy(mt_keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, mt_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, mt_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _duration(seconds: float) -> str:
    """'42s', '7m05s' or '3h12m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _set_aside_metrics(path: Path) -> None:
    """A run starting from scratch writes a fresh metrics file; one left by an earlier run (killed before its
    first checkpoint, or whose checkpoints were deleted) is renamed to metrics.old-N.jsonl, never deleted."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    number = 1
    while (aside := path.with_name(f"{path.stem}.old-{number}{path.suffix}")).exists():
        number += 1
    os.replace(path, aside)
    logger.info("no checkpoint in %s: starting from scratch; the earlier %s was moved to %s", path.parent,
                path.name, aside.name)


def _warn_if_schedule_changed(saved: TrainConfig, current: TrainConfig, step: int) -> None:
    """Resuming with other schedule settings (typically more train.steps to extend a finished run) re-shapes the
    learning-rate curve: a cosine decay is stretched over the new length, so the rate jumps back up."""
    if step >= current.steps:
        return
    ended, before, after = learning_rate(step, saved), learning_rate(step + 1, saved), learning_rate(step + 1, current)
    if math.isclose(before, after, rel_tol=0.05):
        return
    reason = ("the cosine decay now spans the new length" if current.lr_schedule == "cosine" and
              current.steps != saved.steps else "the schedule settings differ")
    logger.warning("the learning-rate schedule changed since the checkpoint (train.steps %d -> %d): the rate at step "
                   "%d becomes %.3g instead of %.3g, because %s. To go on at the rate the checkpoint ended with, "
                   "add train.lr_schedule=constant train.lr=%.3g; for one schedule over all steps, start a new run "
                   "with the final train.steps", saved.steps, current.steps, step + 1, after, before, reason, ended)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (written by the interrupted run after its last checkpoint), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue  # a line cut short when the run was killed
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temp, path)
