"""Checkpointing as a component: saves and restores a run's stateful parts.

The parts are the model weights, the EMA weights, the optimiser, and any number of named `Stateful` parts (data
position, objective state, global RNG states, the run's counters). Weights and optimiser are gathered to full
tensors (FSDP) by every rank and written by rank 0; see `train/checkpoint_files.py` for the on-disk layout. A resume
compares the saved model's architecture (`ModelConfig.architecture()`) and tokenizer with this run's, so run-time
knobs (activation checkpointing, S_max) may change between sessions.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from loopdlm.config import RunConfig, TrainConfig
from loopdlm.data.tokenizers import Tokenizer, load_tokenizer
from loopdlm.errors import UserError, os_error_text
from loopdlm.train.checkpoint_files import (
    TOKENIZER_DIR,
    latest_checkpoint,
    load_checkpoint_config,
    read_training_state,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from loopdlm.train.distributed import (
    DistInfo,
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    on_main_rank,
)
from loopdlm.train.ema import EMA
from loopdlm.train.lr import learning_rate

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    """A part of a run that a checkpoint saves and a resume restores."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunCounters:
    """Updates done, data tokens and FLOPs trained on, seconds of training: the run's progress."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    elapsed: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.flops, self.elapsed = float(state["flops"]), float(state["elapsed"])


class GlobalRNG:
    """Global RNG states (python, numpy, torch CPU and accelerator) as weights_only-loadable values. Training
    itself draws only from seeded generators; these keep any other consumer reproducible across a resume."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        version, keys, gauss = random.getstate()
        kind, mt_keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": [version, list(keys), gauss],
                 "numpy": [kind, torch.from_numpy(mt_keys.astype(np.int64)), pos, has_gauss, cached],
                 "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, keys, gauss = state["python"]
        random.setstate((version, tuple(keys), gauss))
        kind, mt_keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, mt_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


class Checkpointer:
    """Writes and restores checkpoints of a run folder.

    Args:
        out_dir: the run folder (checkpoints/ inside it).
        config: saved beside every checkpoint; its model architecture and tokenizer are checked on resume.
        model, ema, optimizer: the trained module (possibly FSDP-sharded), its EMA (or None) and optimiser.
        counters: the run's progress, saved at the top level of state.pt.
        parts: further named parts saved in state.pt under their names (e.g. "data", "objective", "rng").
        tokenizer: saved with each checkpoint and compared (by content hash) on resume and `train.init_from`.
    """

    def __init__(self, out_dir: Path, config: RunConfig, dist: DistInfo, model: nn.Module, ema: EMA | None,
                 optimizer: torch.optim.Optimizer, counters: RunCounters, parts: dict[str, Stateful],
                 tokenizer: Tokenizer | None = None):
        self.out_dir, self.config, self.dist = out_dir, config, dist
        self.model, self.ema, self.optimizer = model, ema, optimizer
        self.params = list(model.parameters())
        self.counters, self.parts, self.tokenizer = counters, parts, tokenizer
        self.latest: Path | None = None

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (every rank must call it); returns its folder on rank 0."""
        model_state = full_model_state(self.model, self.dist)
        ema_state = None
        if self.ema is not None:
            with self.ema.swapped_into(self.params):
                ema_state = full_model_state(self.model, self.dist)
        optimizer_state = full_optimizer_state(self.model, self.optimizer, self.dist)
        step = self.counters.step

        def write() -> Path:
            training_state = {**self.counters.state_dict(), "optimizer": optimizer_state,
                              **{name: part.state_dict() for name, part in self.parts.items()}}
            try:
                return save_checkpoint(self.out_dir, step, model_state=model_state, ema_state=ema_state,
                                       training_state=training_state, config=self.config,
                                       tokenizer_saver=self.tokenizer.save if self.tokenizer else None,
                                       keep_last=self.config.train.keep_last)
            except OSError as err:
                raise UserError(f"cannot write the checkpoint of step {step} into {self.out_dir}: "
                                f"{os_error_text(err)}; {self.kept_note()}") from None

        self.latest = on_main_rank(self.dist, write)
        return self.latest

    def kept_note(self) -> str:
        """Which checkpoint a failed write leaves as the latest (for error messages)."""
        return f"{self.latest} is still the latest checkpoint" if self.latest else "no checkpoint was written"

    def restore(self, resume: bool | None) -> bool:
        """Continue from out_dir's latest checkpoint (resume None: when there is one; True: require one; False:
        refuse one), else start from `train.init_from`'s weights when set. Returns whether a checkpoint was
        resumed."""
        latest = latest_checkpoint(self.out_dir)
        if resume is False and latest is not None:
            raise UserError(f"{self.out_dir} already holds checkpoints; resume from them or use another out_dir")
        if resume is True and latest is None:
            raise UserError(f"nothing to resume: no checkpoint in {self.out_dir}")
        if latest is not None:
            self._resume_from(latest)
            return True
        self.initialise()
        return False

    def initialise(self) -> None:
        """Load `train.init_from`'s (EMA) weights when it is set."""
        if not self.config.train.init_from:
            return
        folder = resolve_checkpoint(self.config.train.init_from)
        self._check_tokenizer(folder, "train.init_from")
        self._load_weights(folder, use_ema=True)
        if self.ema is not None:
            self.ema.copy_from(self.params)
        logger.info("initialised weights from %s", folder)

    def _resume_from(self, folder: Path) -> None:
        saved = load_checkpoint_config(folder)
        architecture, current = saved.model.architecture(), self.config.model.architecture()
        if architecture != current:
            differing = [key for key, value in architecture.items() if current.get(key) != value]
            hint = (f": it was trained on {saved.data.task and 'task ' + saved.data.task or saved.data.source!r} "
                    f"with a {saved.data.tokenizer} tokenizer, so another data set or tokenizer lives there"
                    if "vocab_size" in differing else "")
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
            for name, part in self.parts.items():
                if state[name]:  # an empty state (e.g. MDLM's objective) leaves the part as it is
                    part.load_state_dict(state[name])
            self.counters.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot resume from {folder}: {' '.join(str(err).split())}") from None
        self.latest = folder
        if self.dist.is_main:
            logger.info("resumed from %s at step %d", folder, self.counters.step)
            _warn_if_schedule_changed(saved.train, self.config.train, self.counters.step)

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


__all__ = ["Checkpointer", "GlobalRNG", "RunCounters", "Stateful"]
