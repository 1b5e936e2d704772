"""What a sampler is, as configuration: a selector with its own options, a loop policy and transforms (CoDD).

`SamplerConfig` is what a run config's `sample:` section holds (nested: `sample.wino.tau1`, `sample.loop.policy`,
`sample.codd.prior`, ...) and what `build_decoder` (sampling/decoder.py) turns into strategy objects. Every selector
name maps to a `SelectorKind` in `SELECTORS`: how to build it from the config, and whether it reads a WINO shadow
block. `FLAGS` names every setting the way the command line and lm-eval's model_args spell it (`--tau1`,
`--loop-eps`, `--codd-tau`, ...); configs written before the nesting hold the same flat names in `sample:`, and
`SamplerConfig.with_flags` maps both onto the nested fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from loopdlm.errors import ConfigError
from loopdlm.sampling.engine import Selector
from loopdlm.sampling.loops import AdaptiveLoops, FixedLoops, ScheduledLoops
from loopdlm.sampling.parallel import EntropyBoundedSelector, FactorSelector
from loopdlm.sampling.selectors import AncestralSelector, FixedScheduleSelector, ThresholdSelector
from loopdlm.sampling.wino import WinoSelector
from loopdlm.settings import NON_NEGATIVE, POSITIVE, PROBABILITY, OneOf, Range, check_fields, setting

LOOP_POLICIES = ("fixed", "scheduled", "adaptive")


@dataclass
class ThresholdOptions:
    """The `threshold` selector (Fast-dLLM)."""

    tau: float = setting(0.9, "threshold sampler: commit slots whose confidence is at least this", PROBABILITY)


@dataclass
class FactorOptions:
    """The `factor` selector (Fast-dLLM factor rule)."""

    f: float = setting(1.0, "factor sampler: Fast-dLLM factor f", Range(0, low_open=True))


@dataclass
class EntropyBoundOptions:
    """The `eb` selector (EB-sampler)."""

    gamma: float = setting(0.1, "eb sampler: entropy budget per step in nats", NON_NEGATIVE)


@dataclass
class WinoOptions:
    """The `wino` selector. Its draft cap per step is min(max(floor(accept_fraction * masked), min_accept),
    max_accept)."""

    tau1: float = setting(0.6, "wino: draft threshold", PROBABILITY)
    tau2: float = setting(0.9, "wino: verify threshold, re-mask below it (0 = never re-mask)", PROBABILITY)
    accept_fraction: float = setting(0.7, "wino: draft cap as a fraction of the masked slots",
                                     Range(0, 1, low_open=True))
    min_accept: int = setting(5, "wino: draft cap at least this", POSITIVE)
    max_accept: int = setting(20, "wino: draft cap at most this", POSITIVE)


@dataclass
class LoopOptions:
    """How many core applications S each forward pass runs."""

    count: int = setting(0, "core applications S per forward pass (0 = the model's training S_max)", NON_NEGATIVE)
    policy: str = setting("fixed", "fixed S; scheduled (more loops at middle mask ratios); adaptive (stop when the "
                          "hidden state converges)", OneOf(LOOP_POLICIES))
    min_count: int = setting(1, "scheduled policy: S at the start and end of decoding", POSITIVE)
    eps: float = setting(0.2, "adaptive policy: stop looping once ||h_k - h_(k-1)|| / ||h_k|| < this (0 = never "
                         "stop early)", NON_NEGATIVE)
    per_token_exit: bool = setting(False, "adaptive policy: freeze converged tokens instead of whole sequences")


@dataclass
class CoDDOptions:
    """CoDD: couple the tokens committed in one step through a trained HMM prior (`loopdlm train-codd`)."""

    prior: str = setting("", "CoDD layer folder (from `loopdlm train-codd`) coupling tokens committed together; "
                         "'' = no coupling")
    tau: float = setting(0.1, "CoDD: temperature on the denoiser's q (sharpens only below 1)", Range(0, low_open=True))
    gamma: float = setting(0.5, "CoDD: couple only below this mask ratio", NON_NEGATIVE)
    any_order: bool = setting(False, "CoDD: commit a step's tokens one at a time from the exact HMM conditional")
    combine_with_sharpened: bool = setting(True, "CoDD: add the HMM's emissions to the sharpened q, as the reference "
                                           "does (false: to the denoiser's own q, so the selector ranks by "
                                           "unsharpened confidences)")


@dataclass(frozen=True)
class SelectorKind:
    """A selector name's meaning: build(config, steps per block) -> Selector; reads_shadow_block: its decisions
    need the WINO shadow block's second opinion, so the decoder wraps its predictor in a `ShadowBlock`."""

    build: Callable[[SamplerConfig, int], Selector]
    reads_shadow_block: bool = False


SELECTORS: dict[str, SelectorKind] = {
    "ancestral": SelectorKind(lambda config, steps: AncestralSelector(steps)),
    "topk": SelectorKind(lambda config, steps: FixedScheduleSelector(steps, "confidence")),
    "random": SelectorKind(lambda config, steps: FixedScheduleSelector(steps, "random")),
    "threshold": SelectorKind(lambda config, steps: ThresholdSelector(config.threshold.tau)),
    "factor": SelectorKind(lambda config, steps: FactorSelector(config.factor.f)),
    "eb": SelectorKind(lambda config, steps: EntropyBoundedSelector(config.eb.gamma)),
    "wino": SelectorKind(lambda config, steps: WinoSelector(config.wino.tau1, config.wino.tau2,
                                                           config.wino.accept_fraction, config.wino.min_accept,
                                                           config.wino.max_accept), reads_shadow_block=True),
}


@dataclass
class SamplerConfig:
    """A complete sampler: the selector and its step budget, the drawing rule, the loop policy and CoDD."""

    sampler: str = setting("ancestral", "which slots to commit each step (a name registered in SELECTORS: "
                           "ancestral, topk, random, threshold, factor, eb, wino)", OneOf(tuple(SELECTORS)))
    steps: int = setting(64, "denoising steps for the whole generated region (split evenly over blocks)", POSITIVE)
    block_length: int = setting(0, "semi-autoregressive block length (0 = one block)", NON_NEGATIVE)
    temperature: float = setting(1.0, "sampling temperature (0 = greedy)", NON_NEGATIVE)
    top_p: float = setting(1.0, "nucleus sampling mass", Range(0, 1, low_open=True))
    threshold: ThresholdOptions = setting(help="threshold selector", default_factory=ThresholdOptions)
    factor: FactorOptions = setting(help="factor selector", default_factory=FactorOptions)
    eb: EntropyBoundOptions = setting(help="entropy-bounded selector", default_factory=EntropyBoundOptions)
    wino: WinoOptions = setting(help="WINO selector", default_factory=WinoOptions)
    loop: LoopOptions = setting(help="loop policy", default_factory=LoopOptions)
    codd: CoDDOptions = setting(help="CoDD coupling", default_factory=CoDDOptions)

    #: Every setting by its command-line / model_args name (a flag --a-b is 'a_b') -> its dotted field path. The
    #: flat `sample:` keys of configs written before the nesting are these names too.
    FLAGS: ClassVar[dict[str, str]] = {
        "sampler": "sampler", "steps": "steps", "block_length": "block_length", "temperature": "temperature",
        "top_p": "top_p", "threshold": "threshold.tau", "factor": "factor.f", "eb_gamma": "eb.gamma",
        "tau1": "wino.tau1", "tau2": "wino.tau2", "wino_accept_fraction": "wino.accept_fraction",
        "wino_min_accept": "wino.min_accept", "wino_max_accept": "wino.max_accept", "loops": "loop.count",
        "loop_policy": "loop.policy", "min_loops": "loop.min_count", "loop_eps": "loop.eps",
        "per_token_exit": "loop.per_token_exit", "codd": "codd.prior", "codd_tau": "codd.tau",
        "codd_gamma": "codd.gamma", "codd_any_order": "codd.any_order",
    }

    @classmethod
    def from_flags(cls, sampler: str = "ancestral", **flags: Any) -> SamplerConfig:
        """The default sampler with `sampler` and the flag-named settings in `flags` (e.g. tau1=0.5, loops=2)."""
        return cls().with_flags(sampler=sampler, **flags)

    def with_flags(self, **flags: Any) -> SamplerConfig:
        """A copy with every flag-named setting of `flags` set (ConfigError for an unknown name); the copy is not
        validated, so a caller can set several flags and validate once."""
        copy = dataclasses.replace(self, **{f.name: dataclasses.replace(getattr(self, f.name))
                                            for f in dataclasses.fields(SamplerConfig)
                                            if dataclasses.is_dataclass(getattr(self, f.name))})
        for name, value in flags.items():
            if name not in self.FLAGS:
                raise ConfigError(f"unknown sampler setting {name!r}; known: {', '.join(sorted(self.FLAGS))}")
            owner, field = copy.field_owner(self.FLAGS[name])
            setattr(owner, field, value)
        return copy

    def flags(self) -> dict[str, Any]:
        """Every setting by its flag name (JSON-ready; what `--json` / `--out` records show)."""
        return {name: getattr(*self.field_owner(path)) for name, path in self.FLAGS.items()}

    def field_owner(self, path: str) -> tuple[Any, str]:
        """(the dataclass holding the dotted `path`, the field's name there): 'wino.tau1' -> (self.wino, 'tau1')."""
        *outer, field = path.split(".")
        owner = self
        for name in outer:
            owner = getattr(owner, name)
        return owner, field

    @property
    def selector_kind(self) -> SelectorKind:
        """The registered meaning of `sampler`."""
        return SELECTORS[self.sampler]

    def validate(self, prefix: str = "") -> None:
        """Raise ConfigError for a value out of range; `prefix` names where the values came from (e.g. 'sample.')."""
        check_fields(self, prefix)
        if self.wino.min_accept > self.wino.max_accept:
            raise ConfigError(f"{prefix}wino.min_accept ({self.wino.min_accept}) must be <= {prefix}wino.max_accept "
                              f"({self.wino.max_accept})")


def build_selector(config: SamplerConfig, steps: int) -> Selector:
    """The selector `config` names, with `steps` denoising steps per block."""
    try:
        return config.selector_kind.build(config, steps)
    except ValueError as exc:
        raise ConfigError(f"bad {config.sampler} sampler settings: {exc}") from None


def build_loop_policy(options: LoopOptions, loops: int):
    """The loop policy of `options` with at most `loops` (>= 1, already resolved from 0 = S_max) per pass."""
    if options.policy == "scheduled":
        return ScheduledLoops(min(options.min_count, loops), loops)
    if options.policy == "adaptive":
        return AdaptiveLoops(loops, options.eps, options.per_token_exit)
    return FixedLoops(loops)
