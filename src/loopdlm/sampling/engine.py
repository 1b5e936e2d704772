"""The one denoising loop every sampler shares.

A sampler is three strategy objects over this loop:
  * a `WindowPredictor` says what distribution to read: the network's p_theta(x_0 | x_t) over the window being
    decoded (full sequence, KV-cached block diffusion, with or without a WINO shadow block; predictors.py);
  * optional `LogitTransform`s reshape that distribution (e.g. CoDD's HMM coupling);
  * a `Selector` says which masked slots to commit (and, for revokable decoding, which to re-mask).
The loop walks the generation region window by window (semi-autoregressive blocks; one window = the whole region
for plain MDLM sampling), draws candidates with float64 Gumbel noise, and keeps the accounting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from loopdlm.errors import UserError


@dataclass
class WindowPrediction:
    """One forward pass's prediction for a window: log_probs float32 [B, W, V] (mask token at -inf),
    core_applications float [B] (loop evaluations this pass), loops: the S this pass was run with (an adaptive
    policy's cap; 0 when the predictor has no loop policy), shadow_log_probs float32 [B, W, V] or None: a second
    opinion on each window slot made without seeing its token (WINO's shadow block, `wino.ShadowBlock`)."""

    log_probs: Tensor
    core_applications: Tensor
    loops: int = 0
    shadow_log_probs: Tensor | None = None


class WindowPredictor(Protocol):
    """What the loop reads: p_theta(x_0 | x_t) for one window of positions."""

    def __call__(self, tokens: Tensor, window: slice, progress: float) -> WindowPrediction:
        """tokens int64 [B, L] (current x_t); window: the positions being decoded; progress in [0, 1]: fraction of
        the generation region already committed (lets loop policies schedule depth)."""

    def begin_window(self, tokens: Tensor, window: slice) -> None:
        """Called before a window is decoded (a KV cache may prepare its prefix)."""

    def end_window(self, tokens: Tensor, window: slice) -> None:
        """Called once a window is fully committed (a KV cache commits it)."""


class LogitTransform(Protocol):
    """Reshapes the per-position distribution before candidates are drawn (e.g. CoDD coupling)."""

    def __call__(self, log_probs: Tensor, tokens: Tensor, selectable: Tensor, generator: torch.Generator | None
                 ) -> Tensor:
        """log_probs float [B, W, V]; tokens int64 [B, W] (window of x_t); selectable bool [B, W]. Returns log-probs
        [B, W, V]."""


@dataclass
class StepContext:
    """Everything a selector may look at in one step (window-local tensors, W = window length)."""

    tokens: Tensor
    log_probs: Tensor
    candidates: Tensor
    confidence: Tensor
    selectable: Tensor
    editable: Tensor
    step: int
    window_masked_at_start: Tensor
    generator: torch.Generator | None
    shadow_log_probs: Tensor | None = None


@dataclass
class Decision:
    """commit bool [B, W]: slots to commit; remask bool [B, W] | None: committed slots revoked; tokens int64
    [B, W] | None: what committed slots receive when the selector drew its own tokens (default: ctx.candidates)."""

    commit: Tensor
    remask: Tensor | None = None
    tokens: Tensor | None = None


class Selector(Protocol):
    """Chooses which masked slots to commit each step."""

    def start_window(self, masked_counts: Tensor) -> None:
        """masked_counts int64 [B]: masked slots per row in the window about to be decoded."""

    def select(self, ctx: StepContext) -> Decision:
        """Decide this step's commits (a subset of ctx.selectable)."""


@dataclass
class SampleStats:
    """Accounting for one decode. forward_passes: batched model calls; row_forward_passes [B]: calls in which the
    row still had masked slots; core_applications [B]: loop evaluations per row summed over its passes;
    committed_per_step: tokens committed per step summed over the batch; wall_time in seconds."""

    forward_passes: int = 0
    row_forward_passes: Tensor | None = None
    core_applications: Tensor | None = None
    committed_per_step: list[int] = field(default_factory=list)
    remasked: int = 0
    wall_time: float = 0.0
    generated_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time."""
        return self.generated_tokens / self.wall_time if self.wall_time > 0 else float("inf")

    def summary(self) -> dict[str, float]:
        """Scalar view for logging: means over rows where a value is per row."""
        return {
            "forward_passes": self.forward_passes,
            "row_forward_passes": float(self.row_forward_passes.float().mean()),
            "core_applications": float(self.core_applications.mean()),
            "steps": len(self.committed_per_step),
            "remasked": self.remasked,
            "wall_time_s": self.wall_time,
            "tokens_per_s": self.tokens_per_second,
        }


@dataclass
class TraceStep:
    """One step of a decode, over the whole canvas (CPU tensors; B rows, L columns).

    tokens int64 [B, L]: x_t after the step; committed bool [B, L]: slots filled this step; confidence float32
    [B, L]: probability of each committed token under the distribution it was drawn from (after logit transforms;
    0 where nothing was committed); remasked bool [B, L]: committed slots revoked this step (WINO); window: the
    columns being decoded; loops: the S of the forward pass the step read (see `WindowPrediction.loops`);
    forward_pass: False when the step reused the previous pass because x_t had not changed; core_applications
    float [B]: loop evaluations run for each row in this step (0 for a reused pass or a row with nothing left).
    """

    tokens: Tensor
    committed: Tensor
    confidence: Tensor
    remasked: Tensor
    window: slice
    loops: int
    forward_pass: bool
    core_applications: Tensor


@dataclass
class DecodeTrace:
    """The canvas before the first step (initial int64 [B, L], CPU) and every step after it."""

    initial: Tensor
    steps: list[TraceStep] = field(default_factory=list)

    def canvases(self) -> list[Tensor]:
        """x_t before the first step and after every step: len(steps) + 1 tensors int64 [B, L]."""
        return [self.initial] + [step.tokens for step in self.steps]


@dataclass
class SampleResult:
    """tokens int64 [B, L] with every editable slot filled; stats; trace: the step-by-step record (when asked)."""

    tokens: Tensor
    stats: SampleStats
    trace: DecodeTrace | None = None


def gumbel_candidates(log_probs: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
                      ) -> Tensor:
    """Draw one token per position from softmax(log_probs / temperature) restricted to the top-p nucleus.

    Uses float64 Gumbel noise (float32 Gumbel lowers the effective temperature). temperature 0 is argmax.
    log_probs: float [B, W, V] -> int64 [B, W].
    """
    scores = log_probs.double()
    if top_p < 1.0:
        scores = _nucleus(scores, top_p)
    if temperature <= 0:
        return scores.argmax(dim=-1)
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
    return (scores / temperature + gumbel).argmax(dim=-1)


def _nucleus(log_probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always at least the best one)."""
    sorted_lp, order = log_probs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return log_probs.masked_fill(drop, float("-inf"))


def generation_region(tokens: Tensor, mask_id: int) -> slice:
    """The columns a decode of `tokens` (int64 [B, L]) walks: from the first column masked in any row to the end;
    an empty slice at L when nothing is masked."""
    masked_columns = (tokens == mask_id).any(dim=0).nonzero()
    length = tokens.shape[1]
    return slice(int(masked_columns[0]) if len(masked_columns) else length, length)


def generate(
    predictor: WindowPredictor,
    tokens: Tensor,
    selector: Selector,
    mask_id: int,
    block_length: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    transforms: tuple[LogitTransform, ...] = (),
    generator: torch.Generator | None = None,
    record_trace: bool = False,
    reuse_unchanged: bool = True,
    max_steps_per_window: int | None = None,
    align_windows: bool = False,
) -> SampleResult:
    """Fill every masked slot of `tokens`.

    Args:
        tokens: int64 [B, L]; slots equal to mask_id are generated, every other token is fixed (prompt prefix,
            infilling context). Rows may have different masks.
        block_length: decode the region [first masked column, L) in windows of this many columns, left to right
            (semi-autoregressive); 0 = one window over that whole region.
        reuse_unchanged: skip the forward pass when x_t has not changed since the last one (valid because the
            predictor is time-independent); forward_passes then counts passes actually run.
        max_steps_per_window: iteration guard; defaults to the selector's `steps` (if any) + 4 * window + 16.
        align_windows: windows are [k * block_length, (k+1) * block_length) in absolute columns (block diffusion's
            blocks, aligned at 0) instead of starting at the first masked column (LLaDA's semi-AR blocks).
    Returns:
        SampleResult; the input tensor is not modified.
    """
    start_time = time.perf_counter()
    tokens = tokens.clone()
    batch, length = tokens.shape
    editable = tokens == mask_id
    if not editable.any():
        raise UserError("nothing to generate: the input has no masked slots")
    first = generation_region(tokens, mask_id).start
    width = block_length if block_length > 0 else length - first
    if align_windows:
        if block_length <= 0:
            raise UserError("align_windows needs block_length > 0")
        first -= first % width
    stats = SampleStats(row_forward_passes=torch.zeros(batch, dtype=torch.long, device=tokens.device),
                        core_applications=torch.zeros(batch, device=tokens.device),
                        generated_tokens=int(editable.sum()))
    trace = DecodeTrace(tokens.to("cpu", copy=True)) if record_trace else None
    total_editable = editable.sum().clamp(min=1)

    for start in range(first, length, width):
        window = slice(start, min(start + width, length))
        predictor.begin_window(tokens, window)
        win_editable = editable[:, window]
        masked_at_start = (tokens[:, window] == mask_id).sum(dim=1)
        selector.start_window(masked_at_start)
        guard = max_steps_per_window or getattr(selector, "steps", 0) + 4 * (window.stop - window.start) + 16
        cached: WindowPrediction | None = None
        step = 0
        while (tokens[:, window] == mask_id).any():
            if step >= guard:
                raise RuntimeError(f"sampler made no progress within {guard} steps in window {window}")
            forward_pass = cached is None or not reuse_unchanged
            if forward_pass:
                progress = float(1 - (tokens == mask_id).sum() / total_editable)
                cached = predictor(tokens, window, progress)
                stats.forward_passes += 1
                has_masks = (tokens[:, window] == mask_id).any(dim=1)
                stats.row_forward_passes += has_masks.long()
                step_core = cached.core_applications * has_masks
                stats.core_applications += step_core
            pass_loops = cached.loops
            window_tokens = tokens[:, window]
            selectable = window_tokens == mask_id
            log_probs = cached.log_probs
            for transform in transforms:
                log_probs = transform(log_probs, window_tokens, selectable, generator)
            candidates = gumbel_candidates(log_probs, temperature, top_p, generator)
            confidence = log_probs.gather(-1, candidates[..., None]).squeeze(-1).exp()
            ctx = StepContext(tokens=window_tokens, log_probs=log_probs, candidates=candidates,
                              confidence=confidence, selectable=selectable, editable=win_editable, step=step,
                              window_masked_at_start=masked_at_start, generator=generator,
                              shadow_log_probs=cached.shadow_log_probs)
            decision = selector.select(ctx)
            commit = decision.commit & selectable
            chosen = decision.tokens if decision.tokens is not None else candidates
            updated = torch.where(commit, chosen, window_tokens)
            remask = torch.zeros_like(commit)
            if decision.remask is not None:
                remask = decision.remask & win_editable & ~selectable
                updated = torch.where(remask, torch.full_like(updated, mask_id), updated)
                stats.remasked += int(remask.sum())
            if not torch.equal(updated, window_tokens):
                tokens[:, window] = updated
                cached = None
            stats.committed_per_step.append(int(commit.sum()))
            if trace is not None:
                chosen_confidence = log_probs.gather(-1, chosen[..., None]).squeeze(-1).exp()
                trace.steps.append(_trace_step(tokens, window, commit, chosen_confidence, remask, pass_loops,
                                               forward_pass, step_core if forward_pass else None))
            step += 1
        predictor.end_window(tokens, window)

    stats.wall_time = time.perf_counter() - start_time
    return SampleResult(tokens=tokens, stats=stats, trace=trace)


def _trace_step(tokens: Tensor, window: slice, commit: Tensor, confidence: Tensor, remask: Tensor, loops: int,
                forward_pass: bool, core_applications: Tensor | None) -> TraceStep:
    """A TraceStep on CPU from window-local commit / confidence / remask [B, W] and the canvas tokens [B, L]."""

    def on_canvas(values: Tensor) -> Tensor:
        full = torch.zeros(tokens.shape, dtype=values.dtype)
        full[:, window] = values.cpu()
        return full

    committed = on_canvas(commit)
    return TraceStep(tokens=tokens.to("cpu", copy=True), committed=committed,
                     confidence=on_canvas(confidence.float()) * committed, remasked=on_canvas(remask), window=window,
                     loops=loops, forward_pass=forward_pass,
                     core_applications=(core_applications.float().cpu() if core_applications is not None
                                        else torch.zeros(tokens.shape[0])))
