"""Continue prompts with any sampler and loop policy: the text-in, text-out generation benchmarks harnesses need.

The decoder (`build_decoder`) decides how: MDLM checkpoints fill a `[left pad | prompt | masks]` canvas within the
training context (as `loopdlm sample`); block-diffusion checkpoints decode block by block with the KV cache and rows
leave the batch as soon as they emit end-of-text or one of the stop strings. Generated ids are cut before the first
end-of-text either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from loopdlm.data.tokenizers import Tokenizer
from loopdlm.errors import UserError
from loopdlm.sampling import Decoder
from loopdlm.sampling.long_generation import Continuations, EosStop


@dataclass
class StopStringStop:
    """Stop a row once its decoded text contains one of `strings` (a harness's `until`); the text is cut later."""

    tokenizer: Tokenizer
    strings: Sequence[str]
    name: str = "stop_string"

    def __call__(self, row: int, generated: list[int], new_from: int) -> int | None:
        text = self.tokenizer.decode(generated)
        return len(generated) if any(s and s in text for s in self.strings) else None


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any non-empty string of `stop`."""
    cut = min((text.index(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_continuations(decoder: Decoder, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                           max_new_tokens: int, stop: Sequence[str] = (), generator: torch.Generator | None = None
                           ) -> Continuations:
    """Up to `max_new_tokens` tokens after each prompt (token ids; cut from the left to fit the decoder's context).

    A block-diffusion decoder slides its cache past its context, and rows stop at end-of-text or at one of the
    `stop` strings; an MDLM decoder's rows never exceed its context: it generates
    min(max_new_tokens, max(context - longest prompt, context // 2)) tokens, the prompts cut from the left when they
    leave less room, and decodes the whole canvas at once. Returns the decoder's Continuations with every sequence
    cut before its first end-of-text.
    """
    if not prompts:
        raise UserError("no prompts given")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = decoder.context
    if decoder.past_context:
        rows = [list(p)[max(0, len(p) - (context - 1)):] for p in prompts]
        new = max_new_tokens
    else:
        longest = max(len(p) for p in prompts)
        # as many new tokens as fit beside the prompts, but at least half the context when that many are asked
        new = max(min(max_new_tokens, context - longest), min(max_new_tokens, context // 2))
        rows = [list(p)[max(0, len(p) - (context - new)):] for p in prompts]
    criteria = (EosStop(tokenizer.eos_id), StopStringStop(tokenizer, stop))
    result = decoder.continue_prompts(rows, new, tokenizer.pad_id, criteria, generator)
    cut = [s[:s.index(tokenizer.eos_id)] if tokenizer.eos_id in s else s for s in result.sequences]
    return replace(result, sequences=cut)
