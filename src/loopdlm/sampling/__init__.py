"""Samplers: one denoising loop (`engine.generate`) driven by selector, denoiser and transform strategies.

`SamplerSpec` names a complete sampler; `build_selector` / `build_loop_policy` turn it into strategy objects, and
`sample` runs it on a model. New selectors register in `SELECTORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from loopdlm.errors import ConfigError, UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling.denoisers import ModelDenoiser
from loopdlm.sampling.engine import SampleResult, Selector, generate
from loopdlm.sampling.loops import AdaptiveLoops, FixedLoops, ScheduledLoops
from loopdlm.sampling.parallel import EntropyBoundedSelector, FactorSelector
from loopdlm.sampling.selectors import AncestralSelector, FixedScheduleSelector, ThresholdSelector
from loopdlm.sampling.wino import WinoDenoiser, WinoSelector
from loopdlm.settings import NON_NEGATIVE, POSITIVE, PROBABILITY, OneOf, Range, check_fields, setting


@dataclass
class SamplerSpec:
    """A complete sampler description (CLI flags map onto these fields; each field's metadata says what it means).

    The WINO draft cap per step is min(max(floor(wino_accept_fraction * masked), wino_min_accept), wino_max_accept).
    """

    sampler: str = setting("ancestral", "which slots to commit each step (a name registered in SELECTORS: "
                           "ancestral, topk, random, threshold, factor, eb, wino)")
    steps: int = setting(64, "denoising steps for the whole generated region (split evenly over blocks)", POSITIVE)
    block_length: int = setting(0, "semi-autoregressive block length (0 = one block)", NON_NEGATIVE)
    temperature: float = setting(1.0, "sampling temperature (0 = greedy)", NON_NEGATIVE)
    top_p: float = setting(1.0, "nucleus sampling mass", Range(0, 1, low_open=True))
    threshold: float = setting(0.9, "threshold sampler: commit slots whose confidence is at least this", PROBABILITY)
    loops: int = setting(0, "core applications S per forward pass (0 = the model's training S_max)", NON_NEGATIVE)
    loop_policy: str = setting("fixed", "fixed S; scheduled (more loops at middle mask ratios); adaptive (stop "
                               "when the hidden state converges)", OneOf(("fixed", "scheduled", "adaptive")))
    min_loops: int = setting(1, "scheduled policy: S at the start and end of decoding", POSITIVE)
    loop_eps: float = setting(0.2, "adaptive policy: stop looping once ||h_k - h_(k-1)|| / ||h_k|| < this "
                              "(0 = never stop early)", NON_NEGATIVE)
    per_token_exit: bool = setting(False, "adaptive policy: freeze converged tokens instead of whole sequences")
    factor: float = setting(1.0, "factor sampler: Fast-dLLM factor f", Range(0, low_open=True))
    eb_gamma: float = setting(0.1, "eb sampler: entropy budget per step in nats", NON_NEGATIVE)
    tau1: float = setting(0.6, "wino: draft threshold", PROBABILITY)
    tau2: float = setting(0.9, "wino: verify threshold, re-mask below it (0 = never re-mask)", PROBABILITY)
    wino_accept_fraction: float = setting(0.7, "wino: draft cap as a fraction of the masked slots",
                                          Range(0, 1, low_open=True))
    wino_min_accept: int = setting(5, "wino: draft cap at least this", POSITIVE)
    wino_max_accept: int = setting(20, "wino: draft cap at most this", POSITIVE)

    def validate(self, prefix: str = "") -> None:
        """Raise ConfigError for a value out of range; `prefix` names where the values came from (e.g. 'sample.')."""
        check_fields(self, prefix)
        if self.sampler not in SELECTORS:
            raise ConfigError(f"{prefix}sampler must be one of {', '.join(sorted(SELECTORS))}, got {self.sampler!r}")
        if self.wino_min_accept > self.wino_max_accept:
            raise ConfigError(f"{prefix}wino_min_accept ({self.wino_min_accept}) must be <= {prefix}wino_max_accept "
                              f"({self.wino_max_accept})")


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
