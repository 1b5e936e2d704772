"""Continue prompts with any sampler and loop policy: the text-in, text-out generation benchmarks harnesses need.

MDLM checkpoints fill a `[left pad | prompt | masks]` canvas within the training context (as `loopdlm sample`);
block-diffusion checkpoints decode block by block with the KV cache and rows leave the batch as soon as they emit
end-of-text or one of the stop strings. Generated ids are cut before the first end-of-text either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loopdlm.data.tokenizers import Tokenizer
from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling import SamplerSpec, prompt_canvas, sample
from loopdlm.sampling.engine import SampleStats
from loopdlm.sampling.long_generation import EosStop, generate_long


@dataclass
class StopStringStop:
    """Stop a row once its decoded text contains one of `strings` (a harness's `until`); the text is cut later."""

    tokenizer: Tokenizer
    strings: Sequence[str]
    name: str = "stop_string"

    def __call__(self, row: int, generated: list[int], new_from: int) -> int | None:
        text = self.tokenizer.decode(generated)
        return len(generated) if any(s and s in text for s in self.strings) else None


@dataclass
class Continuations:
    """sequences: generated token ids per prompt (prompt excluded, cut before the first end-of-text);
    stats: the decode's accounting (forward passes, core applications per row, wall time)."""

    sequences: list[list[int]]
    stats: SampleStats


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any non-empty string of `stop`."""
    cut = min((text.index(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_continuations(model: LoopedTransformer, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                           spec: SamplerSpec, max_new_tokens: int, context: int, block_size: int | None = None,
                           stop: Sequence[str] = (), generator: torch.Generator | None = None) -> Continuations:
    """Up to `max_new_tokens` tokens after each prompt (token ids; cut from the left to fit `context`).

    Args:
        context: the training sequence length; block diffusion slides its cache past it, MDLM rows never exceed
            it: an MDLM generates min(max_new_tokens, max(context - longest prompt, context // 2)) tokens, the
            prompts cut from the left when they leave less room.
        block_size: L' of a block-diffusion checkpoint (None = MDLM).
        stop: strings that end a block-diffusion row early (MDLM decodes the whole canvas at once).
    """
    if not prompts:
        raise UserError("no prompts given")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if block_size is not None and block_size < context:
        rows = [list(p)[max(0, len(p) - (context - 1)):] for p in prompts]
        criteria = (EosStop(tokenizer.eos_id), StopStringStop(tokenizer, stop))
        steps_per_block = max(1, spec.steps // -(-max_new_tokens // block_size))
        result = generate_long(model, rows, tokenizer.mask_id, block_size, spec, max_length=max_new_tokens,
                               stop=criteria, context_window=context, steps_per_block=steps_per_block,
                               generator=generator)
        sequences, stats = result.sequences, result.stats
    else:
        longest = max(len(p) for p in prompts)
        # as many new tokens as fit beside the prompts, but at least half the context when that many are asked
        new = max(min(max_new_tokens, context - longest), min(max_new_tokens, context // 2))
        rows = [list(p)[max(0, len(p) - (context - new)):] for p in prompts]
        longest = max(len(r) for r in rows)
        canvas = prompt_canvas(rows, longest + new, tokenizer.mask_id, tokenizer.pad_id)
        canvas = canvas.to(next(model.parameters()).device)
        result = sample(model, canvas, tokenizer.mask_id, spec, generator)
        sequences, stats = result.tokens[:, longest:].tolist(), result.stats
    cut = [s[:s.index(tokenizer.eos_id)] if tokenizer.eos_id in s else s for s in sequences]
    return Continuations(sequences=cut, stats=stats)
