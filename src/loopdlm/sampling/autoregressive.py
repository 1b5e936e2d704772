"""Left-to-right generation with a causal model (the in-repo judge architecture), with or without a KV cache.

The cached path runs the prompt once under a causal mask, keeps every layer application's keys and values in a
`BlockKVCache` (keys before RoPE, as block diffusion caches them), and then runs one new token per step against the
cache: a single query may attend every cached key, so no mask is needed. The uncached path re-runs the whole prefix
each step and is the reference the cached path must reproduce. No sliding: prompt + generated tokens should stay
within the length the model was trained on.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling.engine import SampleResult, SampleStats, gumbel_candidates
from loopdlm.sampling.kv_cache import BlockKVCache
from loopdlm.models.layers import causal_mask


@torch.no_grad()
def generate_autoregressive(model: LoopedTransformer, prompt: Tensor, length: int, temperature: float = 1.0,
                            top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
                            loops: int = 1) -> SampleResult:
    """Append `length` sampled tokens to every row of `prompt`.

    Args:
        model: a causally trained network (e.g. a `model.causal` model, e.g. a loaded `train-judge` checkpoint); it is
            always given an explicit causal mask, so a plain `LoopedTransformer` works too.
        prompt: int64 [B, P], P >= 1 (rows share the length; the first token conditions the rest).
        length: tokens to generate per row (>= 1).
        temperature, top_p: as the diffusion samplers (float64 Gumbel draws; temperature 0 is greedy).
        use_cache: False re-runs the whole prefix every step (the reference).
        loops: core applications S for a looped causal model (1 otherwise).
    Returns:
        SampleResult with tokens int64 [B, P + length]; stats count one forward pass per step (the prefill
        included), generated_tokens = B * length, wall_time in seconds.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise UserError("autoregressive generation needs a prompt of at least one token per row")
    if length < 1:
        raise UserError(f"length must be >= 1, got {length}")
    start_time = time.perf_counter()
    batch, prompt_length = prompt.shape
    device = prompt.device
    tokens = torch.empty(batch, prompt_length + length, dtype=torch.long, device=device)
    tokens[:, :prompt_length] = prompt
    cache = BlockKVCache()
    out = model(prompt, loops=loops, attn_mask=causal_mask(prompt_length, device), return_present=use_cache)
    for step in range(length):
        end = prompt_length + step
        log_probs = torch.log_softmax(out.logits[:, -1:].float(), dim=-1)
        tokens[:, end] = gumbel_candidates(log_probs, temperature, top_p, generator)[:, 0]
        if step == length - 1:
            break
        if use_cache:
            cache.append(out.present, _positions(end - out.logits.shape[1], end, device), None)
            out = model(tokens[:, end:end + 1], loops=loops, position_ids=_positions(end, end + 1, device),
                        past=cache, return_present=True)
        else:
            out = model(tokens[:, :end + 1], loops=loops, attn_mask=causal_mask(end + 1, device))
    passes = length
    stats = SampleStats(forward_passes=passes,
                        row_forward_passes=torch.full((batch,), passes, dtype=torch.long, device=device),
                        core_applications=torch.full((batch,), float(passes * loops), device=device),
                        committed_per_step=[batch] * length, generated_tokens=batch * length,
                        wall_time=time.perf_counter() - start_time)
    return SampleResult(tokens=tokens, stats=stats)


def _positions(start: int, stop: int, device: torch.device) -> Tensor:
    return torch.arange(start, stop, device=device)[None]
