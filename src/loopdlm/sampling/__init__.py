"""Samplers: one denoising loop (`engine.generate`) driven by selector, denoiser and transform strategies.

`SamplerSpec` names a complete sampler; `build_selector` / `build_loop_policy` turn it into strategy objects, and
`sample` runs it on a model. New selectors register in `SELECTORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling.denoisers import ModelDenoiser
from loopdlm.sampling.engine import SampleResult, Selector, generate
from loopdlm.sampling.loops import AdaptiveLoops, FixedLoops, ScheduledLoops
from loopdlm.sampling.parallel import EntropyBoundedSelector, FactorSelector
from loopdlm.sampling.selectors import AncestralSelector, FixedScheduleSelector, ThresholdSelector
from loopdlm.sampling.wino import WinoDenoiser, WinoSelector


@dataclass
class SamplerSpec:
    """A complete sampler description (CLI flags map onto these fields).

    steps: denoising steps for the whole region (split evenly over blocks); block_length 0 = one block.
    loops: core applications S (0 = the model's training S_max); loop_policy: 'fixed' | 'scheduled' | 'adaptive'.
    factor: Fast-dLLM factor f ('factor'); eb_gamma: EB-sampler entropy budget in nats ('eb').
    tau1 / tau2: WINO draft / verify thresholds ('wino'; tau2 = 0 never re-masks); the WINO draft cap per step is
    min(max(floor(wino_accept_fraction * masked), wino_min_accept), wino_max_accept).
    """

    sampler: str = "ancestral"
    steps: int = 64
    block_length: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    threshold: float = 0.9
    loops: int = 0
    loop_policy: str = "fixed"
    min_loops: int = 1
    loop_eps: float = 0.02
    per_token_exit: bool = False
    factor: float = 1.0
    eb_gamma: float = 0.1
    tau1: float = 0.6
    tau2: float = 0.9
    wino_accept_fraction: float = 0.7
    wino_min_accept: int = 5
    wino_max_accept: int = 20


SELECTORS: dict[str, Callable[[SamplerSpec, int], Selector]] = {
    "ancestral": lambda spec, steps: AncestralSelector(steps),
    "topk": lambda spec, steps: FixedScheduleSelector(steps, "confidence"),
    "random": lambda spec, steps: FixedScheduleSelector(steps, "random"),
    "threshold": lambda spec, steps: ThresholdSelector(spec.threshold),
    "factor": lambda spec, steps: FactorSelector(spec.factor),
    "eb": lambda spec, steps: EntropyBoundedSelector(spec.eb_gamma),
    "wino": lambda spec, steps: WinoSelector(spec.tau1, spec.tau2, spec.wino_accept_fraction, spec.wino_min_accept,
                                             spec.wino_max_accept),
}


def build_selector(spec: SamplerSpec, region_length: int) -> Selector:
    """Selector for `spec`; steps are split evenly over the blocks of a region of `region_length` slots."""
    if spec.sampler not in SELECTORS:
        raise UserError(f"unknown sampler '{spec.sampler}'; choose one of {sorted(SELECTORS)}")
    if spec.steps < 1:
        raise UserError(f"steps must be >= 1, got {spec.steps}")
    blocks = -(-region_length // spec.block_length) if spec.block_length > 0 else 1
    try:
        return SELECTORS[spec.sampler](spec, max(1, spec.steps // blocks))
    except ValueError as exc:
        raise UserError(f"bad {spec.sampler} sampler settings: {exc}") from None


def build_loop_policy(spec: SamplerSpec, model: LoopedTransformer):
    """Loop policy for `spec`; loops = 0 means the model's training maximum S_max."""
    loops = spec.loops or model.config.max_loops
    if loops < 1:
        raise UserError(f"loops must be >= 1, got {spec.loops}")
    if spec.loop_policy == "fixed":
        return FixedLoops(loops)
    if spec.loop_policy == "scheduled":
        return ScheduledLoops(min(spec.min_loops, loops), loops)
    if spec.loop_policy == "adaptive":
        return AdaptiveLoops(loops, spec.loop_eps, spec.per_token_exit)
    raise UserError(f"unknown loop policy '{spec.loop_policy}'; choose fixed, scheduled or adaptive")


def sample(model: LoopedTransformer, tokens: Tensor, mask_id: int, spec: SamplerSpec,
           generator: torch.Generator | None = None, record_trace: bool = False, transforms=(),
           wrap_selector: Callable[[Selector], Selector] | None = None) -> SampleResult:
    """Fill the masked slots of `tokens` (int64 [B, L]) with the sampler `spec` (see `engine.generate`).

    transforms: logit transforms (e.g. CoDD coupling); wrap_selector: decorates the selector (e.g. any-order CoDD).
    """
    editable_columns = (tokens == mask_id).any(dim=0).nonzero()
    region = tokens.shape[1] - int(editable_columns[0]) if len(editable_columns) else 0
    selector = build_selector(spec, max(region, 1))
    if wrap_selector is not None:
        selector = wrap_selector(selector)
    # WINO's verify step reads a shadow block that only WinoDenoiser computes.
    denoiser_class = WinoDenoiser if spec.sampler == "wino" else ModelDenoiser
    denoiser = denoiser_class(model, mask_id, build_loop_policy(spec, model))
    return generate(denoiser, tokens, selector, mask_id, block_length=spec.block_length,
                    temperature=spec.temperature, top_p=spec.top_p, transforms=tuple(transforms),
                    generator=generator, record_trace=record_trace)


def prompt_canvas(prompts: list[list[int]], length: int, mask_id: int, pad_id: int) -> Tensor:
    """Rows of [left pad | prompt | masks] of total `length`, so every row's generation starts at the same column.

    prompts: token ids per row (may be empty) -> int64 [B, length]. Raises UserError if a prompt leaves no room.
    """
    longest = max((len(p) for p in prompts), default=0)
    if longest >= length:
        raise UserError(f"prompt of {longest} tokens leaves no room to generate within length {length}")
    canvas = torch.full((len(prompts), length), mask_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        canvas[row, :longest] = pad_id
        if prompt:
            canvas[row, longest - len(prompt):longest] = torch.tensor(prompt, dtype=torch.long)
    return canvas


__all__ = ["SELECTORS", "SampleResult", "SamplerSpec", "build_loop_policy", "build_selector", "generate",
           "prompt_canvas", "sample"]
