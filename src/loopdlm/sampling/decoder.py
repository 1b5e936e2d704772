"""One decoder builder: (model, diffusion, sampler config) -> the decoder every caller decodes with.

`build_decoder` turns a `SamplerConfig` into strategy objects once: the selector its name registers (sampler_config.
SELECTORS), the loop policy, the CoDD transform or any-order selector loaded from `sampler.codd.prior`, and the
window predictor: the full sequence for canvases, the KV-cached block predictor for block diffusion, either of them
in a `ShadowBlock` when the selector reads WINO's second opinion. Callers then ask the `Decoder` for what they need:

* `fill(canvas)`: fill the masked slots of a canvas (prompts, task answers, infilling) with the full sequence;
* `continue_prompts(prompts, n)`: n new tokens after each prompt: a `[left pad | prompt | masks]` canvas for an MDLM
  model, block by block past the training context for a block-diffusion model (`long_generation.generate_long`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from loopdlm.diffusion.masked import DiffusionConfig
from loopdlm.errors import ConfigError, UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling.canvas import prompt_canvas
from loopdlm.sampling.codd import HMMPrior
from loopdlm.sampling.coupling import AnyOrderCoDDSelector, CoDDTransform, load_codd_layer
from loopdlm.sampling.engine import (LogitTransform, SampleResult, Selector, WindowPredictor, generate,
                                     generation_region)
from loopdlm.sampling.kv_cache import CacheOptions, CachedBlockPredictor
from loopdlm.sampling.long_generation import BlockTrace, Continuations, StopCriterion, generate_long
from loopdlm.sampling.predictors import FullSequencePredictor, NetworkPredictor
from loopdlm.sampling.sampler_config import SELECTORS, CoDDOptions, SamplerConfig, build_loop_policy, build_selector
from loopdlm.sampling.wino import ShadowBlock


@dataclass
class Coupling:
    """CoDD as a decode uses it: a trained prior with its settings (None = no coupling). Every decode gets fresh
    strategy objects, so CoDD's own generator restarts from its seed and a decode does not depend on earlier ones.

    settings: keyword arguments of CoDDTransform / AnyOrderCoDDSelector (temperature, gamma, window, seed, ...);
    any_order: couple by committing one token at a time (a selector wrapper) instead of a logit transform.
    """

    prior: HMMPrior | None = None
    settings: dict = field(default_factory=dict)
    any_order: bool = False
    sampling_temperature: float = 1.0
    top_p: float = 1.0

    def transforms(self) -> tuple[LogitTransform, ...]:
        """The logit transforms of one decode."""
        if self.prior is None or self.any_order:
            return ()
        return (CoDDTransform(self.prior, **self.settings),)

    def wrap(self, selector: Selector) -> Selector:
        """The selector one decode runs: `selector`, or the any-order CoDD selector around it."""
        if self.prior is None or not self.any_order:
            return selector
        return AnyOrderCoDDSelector(selector, self.prior, sampling_temperature=self.sampling_temperature,
                                    top_p=self.top_p, **self.settings)


class Decoder:
    """A model ready to decode with one sampler (built by `build_decoder`; see the module docstring).

    Attributes: model, mask_id, sampler (the SamplerConfig), loops (the S the loop policy runs at most: the
    sampler's, or the model's training S_max for 0), block_size (L' of a block-diffusion model, None for MDLM),
    context (the training context; block diffusion slides its cache past it), cache_options, coupling.
    """

    def __init__(self, model: LoopedTransformer, mask_id: int, sampler: SamplerConfig, loops: int,
                 block_size: int | None, context: int | None, cache_options: CacheOptions, coupling: Coupling):
        self.model = model
        self.mask_id = mask_id
        self.sampler = sampler
        self.loops = loops
        self.block_size = block_size
        self.context = context
        self.cache_options = cache_options
        self.coupling = coupling

    @property
    def device(self) -> torch.device:
        """Where the model (and so every canvas) lives."""
        return next(self.model.parameters()).device

    @property
    def past_context(self) -> bool:
        """Whether `continue_prompts` decodes block by block, and so may go past the training context."""
        return self.block_size is not None

    def _with_shadow(self, predictor: NetworkPredictor) -> WindowPredictor:
        return ShadowBlock(predictor) if self.sampler.selector_kind.reads_shadow_block else predictor

    def loop_policy(self):
        """The loop policy each predictor runs: the sampler's, at most `loops` per pass."""
        return build_loop_policy(self.sampler.loop, self.loops)

    def sequence_predictor(self) -> WindowPredictor:
        """The full-sequence predictor `fill` reads (in a ShadowBlock when the selector needs one)."""
        return self._with_shadow(FullSequencePredictor(self.model, self.mask_id, self.loop_policy()))

    def block_predictor(self, padding: Tensor | None = None) -> WindowPredictor:
        """A fresh KV-cached block predictor for one canvas whose first columns may be padding (bool [B, P], True =
        pad), in a ShadowBlock when the selector needs one."""
        options = CacheOptions(self.cache_options.reuse_last_loop, self.context, self.cache_options.commit_loops)
        return self._with_shadow(CachedBlockPredictor(self.model, self.mask_id, self.loop_policy(), self.block_size,
                                                      options, padding))

    def selector(self, region_length: int) -> Selector:
        """The selector for a region of `region_length` slots, the sampler's steps split evenly over its blocks."""
        block_length = self.sampler.block_length
        blocks = -(-region_length // block_length) if block_length > 0 else 1
        return self.coupling.wrap(build_selector(self.sampler, max(1, self.sampler.steps // blocks)))

    def block_selector(self, steps: int) -> Selector:
        """The selector for one block-diffusion block decoded in `steps` steps."""
        if self.coupling.any_order:
            raise UserError("--codd-any-order is not available for block-diffusion generation; drop it "
                            "(sample.codd.any_order)")
        return build_selector(self.sampler, max(1, steps))

    def run(self, predictor: WindowPredictor, canvas: Tensor, selector: Selector,
            transforms: tuple[LogitTransform, ...], generator: torch.Generator | None, record_trace: bool,
            block_length: int, align_windows: bool = False) -> SampleResult:
        """The shared loop over `canvas` (int64 [B, L]) with this sampler's drawing rule."""
        return generate(predictor, canvas, selector, self.mask_id, block_length=block_length,
                        temperature=self.sampler.temperature, top_p=self.sampler.top_p, transforms=transforms,
                        generator=generator, record_trace=record_trace, align_windows=align_windows)

    def fill(self, canvas: Tensor, generator: torch.Generator | None = None, record_trace: bool = False,
             predictor: WindowPredictor | None = None) -> SampleResult:
        """Fill the masked slots of `canvas` (int64 [B, L], on the model's device; other slots are kept).

        predictor: read this instead of `sequence_predictor()` (e.g. one wrapped to record every state).
        """
        region = generation_region(canvas, self.mask_id)
        selector = self.selector(max(region.stop - region.start, 1))
        return self.run(predictor or self.sequence_predictor(), canvas, selector, self.coupling.transforms(),
                        generator, record_trace, self.sampler.block_length)

    def continue_prompts(self, prompts: list[list[int]], new_tokens: int, pad_id: int,
                         stop: tuple[StopCriterion, ...] = (), generator: torch.Generator | None = None,
                         record_trace: bool = False) -> Continuations:
        """`new_tokens` tokens after each prompt (token ids per row, may be empty).

        MDLM: one `[left pad (pad_id) | prompt | masks]` canvas (prompt + new_tokens must fit the caller's context;
        `stop` is not consulted, every row runs to new_tokens). Block diffusion: block by block (the sampler's
        steps split evenly over the blocks of new_tokens), rows stopping at the first criterion of `stop` that fires.
        """
        if self.past_context:
            steps_per_block = max(1, self.sampler.steps // math.ceil(new_tokens / self.block_size))
            return generate_long(self, prompts, new_tokens, stop, steps_per_block, generator, record_trace)
        longest = max((len(p) for p in prompts), default=0)
        canvas = prompt_canvas(prompts, longest + new_tokens, self.mask_id, pad_id).to(self.device)
        result = self.fill(canvas, generator, record_trace)
        rows = list(range(len(prompts)))
        traces = [BlockTrace(rows, result.trace)] if record_trace else None
        return Continuations(sequences=result.tokens[:, longest:].tolist(), stop_reasons=["max_length"] * len(rows),
                             stats=result.stats, traces=traces, prompt_padding=(canvas[:, :longest] == pad_id).cpu())


def build_coupling(options: CoDDOptions, model: LoopedTransformer, sampler: SamplerConfig,
                   tokenizer_fingerprint: str | None, seed: int) -> Coupling:
    """CoDD from `options`: no coupling when no prior folder is set; the prior is loaded onto the model's device
    and checked against its vocabulary and (when given) the tokenizer's fingerprint."""
    if not options.prior:
        return Coupling()
    device = next(model.parameters()).device
    prior, layer = load_codd_layer(options.prior, model.config.vocab_size, tokenizer_fingerprint, device)
    settings = dict(temperature=options.tau, gamma=options.gamma, window=layer["window"],
                    combine_with_sharpened=options.combine_with_sharpened, seed=seed)
    return Coupling(prior, settings, options.any_order, sampler.temperature, sampler.top_p)


def build_decoder(model: LoopedTransformer, diffusion: DiffusionConfig | None, sampler: SamplerConfig, mask_id: int,
                  context: int | None = None, cache_options: CacheOptions | None = None,
                  tokenizer_fingerprint: str | None = None, seed: int = 0) -> Decoder:
    """The decoder of `model` (on the device to decode on) under `sampler`.

    Args:
        diffusion: the model's noise process; a `block_size` below `context` (or any block_size when context is
            None) makes `continue_prompts` decode block by block with the KV cache. None = MDLM.
        sampler: validated here (ConfigError naming the `sample.` key of a bad value).
        mask_id: the tokenizer's mask id.
        context: the training context (block diffusion's cache slides past it; None = never slides).
        cache_options: block KV cache behaviour (its context_window is replaced by `context`).
        tokenizer_fingerprint: checked against a CoDD prior's (None = not checked).
        seed: seed of CoDD's own generator (the sampler's draws come from the generator passed per decode).
    """
    if sampler.sampler not in SELECTORS:
        raise ConfigError(f"unknown sampler {sampler.sampler!r}; choose one of {', '.join(sorted(SELECTORS))}")
    sampler.validate("sample.")
    block_size = diffusion.block_size if diffusion is not None else None
    if block_size is not None and context is not None and block_size >= context:
        block_size = None  # a block as long as the context is MDLM
    loops = sampler.loop.count or model.config.max_loops
    coupling = build_coupling(sampler.codd, model, sampler, tokenizer_fingerprint, seed)
    return Decoder(model, mask_id, sampler, loops, block_size, context, cache_options or CacheOptions(), coupling)
