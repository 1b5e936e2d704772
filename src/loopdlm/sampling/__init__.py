"""Samplers: one denoising loop (`engine.generate`) driven by window predictor, logit transform and selector
strategies. A `SamplerConfig` (sampler_config.py) describes a sampler; `build_decoder` (decoder.py) turns it, with a
model, into the `Decoder` every caller decodes with. This package only re-exports those names."""

from loopdlm.sampling.canvas import prompt_canvas
from loopdlm.sampling.decoder import Decoder, build_decoder
from loopdlm.sampling.engine import SampleResult, generate
from loopdlm.sampling.sampler_config import SELECTORS, SamplerConfig

__all__ = ["SELECTORS", "Decoder", "SampleResult", "SamplerConfig", "build_decoder", "generate", "prompt_canvas"]
