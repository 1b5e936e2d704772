"""Block-diffusion generation of arbitrary length: keep decoding blocks until every row has stopped.

Prompts are left-padded to a whole number of blocks (pad columns never enter attention), so generation starts on a
block boundary. Each new block is decoded by the shared loop (`engine.generate`) with the decoder's KV-cached block
predictor (`CachedBlockPredictor`, in a `ShadowBlock` for WINO); after
every block each row's stop criteria are checked, and a row that stopped leaves the batch (its later blocks are
neither computed nor counted). Past `context_window` the cache slides (see `kv_cache`).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from loopdlm.errors import UserError
from loopdlm.sampling.canvas import block_prompt_canvas
from loopdlm.sampling.engine import DecodeTrace, SampleStats

if TYPE_CHECKING:
    from loopdlm.sampling.decoder import Decoder


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
class Continuations:
    """What a decoder generated after a list of prompts. sequences: generated token ids per row (prompt excluded,
    cut at the stop point); stop_reasons: the criterion name that stopped each row, or 'max_length'; stats:
    accounting over every block (row_forward_passes and core_applications [B] in the original row order;
    generated_tokens counts kept tokens only); traces: one BlockTrace per block, in order (when asked; a canvas
    decode is one block of every row); prompt_padding bool [B, P]: the left-pad columns of the prompt canvas, which
    are never attended to nor shown."""

    sequences: list[list[int]]
    stop_reasons: list[str]
    stats: SampleStats = field(default_factory=SampleStats)
    traces: list[BlockTrace] | None = None
    prompt_padding: Tensor | None = None


def generate_long(decoder: Decoder, prompt_ids: list[list[int]], max_length: int = 1024,
                  stop: tuple[StopCriterion, ...] = (), steps_per_block: int | None = None,
                  generator: torch.Generator | None = None, record_trace: bool = False) -> Continuations:
    """Generate up to `max_length` tokens after each prompt, one block at a time, until every row has stopped.

    Args:
        decoder: a block-diffusion decoder (`build_decoder` with a block size): its model, block size L', sampler
            (selector, temperature, top_p, loop policy, CoDD transform; its `steps` and `block_length` are not
            used), context window (the cache slides past it) and cache options.
        prompt_ids: token ids per row (may be empty; rows may differ in length).
        max_length: cap on generated tokens per row.
        stop: criteria checked after each block; the first that fires stops the row.
        steps_per_block: denoising steps per block (default L', i.e. about one token per forward pass).
        record_trace: keep every block's step-by-step trace (`Continuations.traces`).
    """
    if decoder.block_size is None:
        raise UserError("block-by-block generation needs a block-diffusion decoder (a diffusion block_size below "
                        "the context)")
    if not prompt_ids:
        raise UserError("no prompts given")
    if max_length < 1:
        raise UserError(f"max_length must be >= 1, got {max_length}")
    block_size, mask_id, model = decoder.block_size, decoder.mask_id, decoder.model
    device = decoder.device
    filler = (mask_id + 1) % model.config.vocab_size  # pad columns never enter attention; any non-mask id works
    tokens, padding = (t.to(device) for t in block_prompt_canvas(prompt_ids, block_size, filler))
    predictor = decoder.block_predictor(padding)
    transforms = decoder.coupling.transforms()  # one CoDD random stream over every block
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
        result = decoder.run(predictor, tokens, decoder.block_selector(steps_per_block or block_size), transforms,
                             generator, record_trace, block_size, align_windows=True)
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
            predictor.select_rows(index)
            active = [active[position] for position in keep]
        generated += width
    stats.wall_time = time.perf_counter() - start_time
    stats.generated_tokens = sum(len(s) for s in sequences)
    return Continuations(sequences=sequences, stop_reasons=reasons, stats=stats, traces=traces,
                         prompt_padding=prompt_padding)


def _accumulate(total: SampleStats, part: SampleStats, rows: Tensor) -> None:
    """Add one block's accounting (over the active `rows`) to the running totals."""
    total.forward_passes += part.forward_passes
    total.row_forward_passes.index_add_(0, rows, part.row_forward_passes)
    total.core_applications.index_add_(0, rows, part.core_applications)
    total.committed_per_step.extend(part.committed_per_step)
    total.remasked += part.remasked
