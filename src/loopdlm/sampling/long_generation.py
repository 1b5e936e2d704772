"""Block-diffusion generation of arbitrary length: keep decoding blocks until every row has stopped.

Prompts are left-padded to a whole number of blocks (pad columns never enter attention), so generation starts on a
block boundary. Each new block is decoded by the shared loop (`engine.generate`) with a `CachedBlockDenoiser`; after
every block each row's stop criteria are checked, and a row that stopped leaves the batch (its later blocks are
neither computed nor counted). Past `context_window` the cache slides (see `kv_cache`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling import SamplerSpec, build_loop_policy, build_selector
from loopdlm.sampling.engine import DecodeTrace, SampleStats, generate
from loopdlm.sampling.kv_cache import CacheOptions, CachedBlockDenoiser
from loopdlm.sampling.wino import CachedWinoDenoiser


class StopCriterion(Protocol):
    """Decides after each block whether a row stops. `name` is reported as the row's stop reason."""

    name: str

    def __call__(self, row: int, generated: list[int], new_from: int) -> int | None:
        """row: the row's index in the prompt list; generated: its generated token ids so far; new_from: index where
        the newest block starts. Returns how many tokens to keep if the row stops now, else None."""


@dataclass
class EosStop:
    """Stop at the first `eos_id` in the newest block, keeping the EOS token."""

    eos_id: int
    name: str = "eos"

    def __call__(self, row: int, generated: list[int], new_from: int) -> int | None:
        for index in range(new_from, len(generated)):
            if generated[index] == self.eos_id:
                return index + 1
        return None


@dataclass
class LowEntropyStop:
    """Stop when the unigram entropy (nats) of the row's last `window` tokens falls below `threshold` (degenerate,
    repetitive output; BD3-LM's variable-length sampler uses the same signal)."""

    threshold: float
    window: int = 256
    name: str = "low_entropy"

    def __call__(self, row: int, generated: list[int], new_from: int) -> int | None:
        if len(generated) < self.window:
            return None
        counts = Counter(generated[-self.window:]).values()
        entropy = -sum(c / self.window * math.log(c / self.window) for c in counts)
        return len(generated) if entropy < self.threshold else None


@dataclass
class RepetitionStop:
    """Stop when the row's final `ngram` tokens have occurred at least `count` times in its output."""

    ngram: int = 8
    count: int = 3
    name: str = "repetition"

    def __call__(self, row: int, generated: list[int], new_from: int) -> int | None:
        if len(generated) < self.ngram * self.count:
            return None
        tail = generated[-self.ngram:]
        seen = sum(generated[i:i + self.ngram] == tail for i in range(len(generated) - self.ngram + 1))
        return len(generated) if seen >= self.count else None


@dataclass
class BlockTrace:
    """The decode of one block: rows: the original index of each row still generating; trace: the engine's
    record over those rows' canvases int64 [len(rows), N] (prompt canvas, earlier blocks, this block)."""

    rows: list[int]
    trace: DecodeTrace


@dataclass
class LongGenerationResult:
    """sequences: generated token ids per row (prompt excluded, cut at the stop point); stop_reasons: the
    criterion name that stopped each row, or 'max_length'; stats: accounting over every block (row_forward_passes
    and core_applications [B] in the original row order; generated_tokens counts kept tokens only); traces: one
    BlockTrace per block, in order (when asked); prompt_padding bool [B, P]: the left-pad columns of the prompt
    canvas, which hold a filler id that is never attended to."""

    sequences: list[list[int]]
    stop_reasons: list[str]
    stats: SampleStats = field(default_factory=SampleStats)
    traces: list[BlockTrace] | None = None
    prompt_padding: Tensor | None = None


def block_prompt_canvas(prompts: list[list[int]], block_size: int, filler: int) -> tuple[Tensor, Tensor]:
    """Prompts right-aligned on a canvas whose width is the longest prompt rounded up to whole blocks.

    Returns (tokens int64 [B, P], padding bool [B, P], True = pad column holding `filler`).
    """
    width = -(-max((len(p) for p in prompts), default=0) // block_size) * block_size
    tokens = torch.full((len(prompts), width), filler, dtype=torch.long)
    padding = torch.ones(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            padding[row, width - len(prompt):] = False
    return tokens, padding


def generate_long(model: LoopedTransformer, prompt_ids: list[list[int]], mask_id: int, block_size: int,
                  spec: SamplerSpec | None = None, max_length: int = 1024, stop: tuple[StopCriterion, ...] = (),
                  context_window: int | None = None, steps_per_block: int | None = None,
                  generator: torch.Generator | None = None, cache_options: CacheOptions | None = None,
                  transforms: tuple = (), record_trace: bool = False) -> LongGenerationResult:
    """Generate up to `max_length` tokens after each prompt, one block at a time, until every row has stopped.

    Args:
        model: a block-diffusion-trained denoiser (on the device the prompts should run on).
        prompt_ids: token ids per row (may be empty; rows may differ in length).
        block_size: L'.
        spec: sampler (selector, temperature, top_p, loops, loop policy); its `steps` and `block_length` are ignored.
        max_length: cap on generated tokens per row.
        stop: criteria checked after each block; the first that fires stops the row.
        context_window: cache + current block never exceed this many positions (default: no sliding).
        steps_per_block: denoising steps per block (default L', i.e. about one token per forward pass).
        cache_options: reuse_last_loop / commit_loops; `context_window` above overrides its field.
        transforms: logit transforms for every block (e.g. CoDD coupling).
        record_trace: keep every block's step-by-step trace (`LongGenerationResult.traces`).
    """
    if not prompt_ids:
        raise UserError("no prompts given")
    if max_length < 1:
        raise UserError(f"max_length must be >= 1, got {max_length}")
    spec = replace(spec or SamplerSpec(), steps=steps_per_block or block_size, block_length=block_size)
    options = replace(cache_options or CacheOptions(), context_window=context_window)
    device = model.head.weight.device
    filler = (mask_id + 1) % model.config.vocab_size  # pad columns never enter attention; any non-mask id works
    tokens, padding = (t.to(device) for t in block_prompt_canvas(prompt_ids, block_size, filler))
    # WINO's verify step reads a shadow block that only the WINO denoiser computes.
    denoiser_class = CachedWinoDenoiser if spec.sampler == "wino" else CachedBlockDenoiser
    denoiser = denoiser_class(model, mask_id, build_loop_policy(spec, model), block_size, options, padding)
    rows = len(prompt_ids)
    stats = SampleStats(row_forward_passes=torch.zeros(rows, dtype=torch.long, device=device),
                        core_applications=torch.zeros(rows, device=device))
    sequences: list[list[int]] = [[] for _ in range(rows)]
    reasons = ["max_length"] * rows
    active = list(range(rows))
    traces: list[BlockTrace] | None = [] if record_trace else None
    prompt_padding = padding.cpu()
    start_time = time.perf_counter()
    generated = 0
    while active and generated < max_length:
        width = min(block_size, max_length - generated)
        tokens = torch.cat((tokens, torch.full((len(active), width), mask_id, dtype=torch.long, device=device)), 1)
        result = generate(denoiser, tokens, build_selector(spec, block_size), mask_id, block_length=block_size,
                          temperature=spec.temperature, top_p=spec.top_p, transforms=tuple(transforms),
                          generator=generator, align_windows=True, record_trace=record_trace)
        tokens = result.tokens
        if traces is not None:
            traces.append(BlockTrace(list(active), result.trace))
        _accumulate(stats, result.stats, torch.tensor(active, device=device))
        keep = []
        for position, (row, block) in enumerate(zip(active, tokens[:, -width:].tolist())):
            new_from = len(sequences[row])
            sequences[row].extend(block)
            for criterion in stop:
                cut = criterion(row, sequences[row], new_from)
                if cut is not None:
                    del sequences[row][cut:]
                    reasons[row] = criterion.name
                    break
            else:
                keep.append(position)
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            tokens = tokens.index_select(0, index)
            denoiser.select_rows(index)
            active = [active[position] for position in keep]
        generated += width
    stats.wall_time = time.perf_counter() - start_time
    stats.generated_tokens = sum(len(s) for s in sequences)
    return LongGenerationResult(sequences=sequences, stop_reasons=reasons, stats=stats, traces=traces,
                                prompt_padding=prompt_padding)


def _accumulate(total: SampleStats, part: SampleStats, rows: Tensor) -> None:
    """Add one block's accounting (over the active `rows`) to the running totals."""
    total.forward_passes += part.forward_passes
    total.row_forward_passes.index_add_(0, rows, part.row_forward_passes)
    total.core_applications.index_add_(0, rows, part.core_applications)
    total.committed_per_step.extend(part.committed_per_step)
    total.remasked += part.remasked


def sample_blocks(model: LoopedTransformer, prompts: list[list[int]], mask_id: int, eos_id: int | None,
                  spec: SamplerSpec, length: int, block_size: int | None = None, context_window: int | None = None,
                  generator: torch.Generator | None = None, cache_options: CacheOptions | None = None,
                  transforms: tuple = (), record_trace: bool = False) -> LongGenerationResult:
    """CLI entry: up to `length` tokens per prompt with a block-diffusion model, stopping rows at `eos_id`.

    `spec.steps` is the step budget for the whole `length` (split evenly over its blocks, as in `sample`);
    block_size defaults to `spec.block_length`.
    """
    block_size = block_size or spec.block_length
    if block_size < 1:
        raise UserError("block diffusion sampling needs a block size (spec.block_length or block_size)")
    steps_per_block = max(1, spec.steps // -(-length // block_size))
    stop = (EosStop(eos_id),) if eos_id is not None else ()
    return generate_long(model, prompts, mask_id, block_size, spec, max_length=length, stop=stop,
                         context_window=context_window, steps_per_block=steps_per_block, generator=generator,
                         cache_options=cache_options, transforms=transforms, record_trace=record_trace)
