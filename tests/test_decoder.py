"""The decoder builder and the sampler config: one place turns a config into strategy objects, old flat config keys
and the command-line flags land on the same nested fields."""

import argparse

import pytest
import torch

from conftest import make_model
from loopdlm.commands.sample import add_sampler_arguments, sampler_spec_from_args
from loopdlm.config import RunConfig, apply_overrides
from loopdlm.diffusion.masked import DiffusionConfig
from loopdlm.errors import UserError
from loopdlm.sampling import SamplerConfig, build_decoder, prompt_canvas
from loopdlm.sampling.kv_cache import CachedBlockPredictor
from loopdlm.sampling.loops import AdaptiveLoops, ScheduledLoops
from loopdlm.sampling.predictors import FullSequencePredictor
from loopdlm.sampling.selectors import ThresholdSelector
from loopdlm.sampling.wino import ShadowBlock, WinoSelector

MASK, PAD = 0, 1

#: The `sample:` section as checkpoints written before the nesting hold it (every key flat).
FLAT_SAMPLE_SECTION = {
    "sampler": "wino", "steps": 32, "block_length": 8, "temperature": 0.5, "top_p": 0.9, "threshold": 0.8,
    "loops": 3, "loop_policy": "adaptive", "min_loops": 2, "loop_eps": 0.1, "per_token_exit": True, "factor": 2.0,
    "eb_gamma": 0.3, "tau1": 0.4, "tau2": 0.7, "wino_accept_fraction": 0.5, "wino_min_accept": 2,
    "wino_max_accept": 9, "num_samples": 3, "length": 40, "eval_loops": [1, 2],
}


def test_an_old_flat_sample_section_loads_into_the_nested_fields():
    config = RunConfig.from_dict({"sample": FLAT_SAMPLE_SECTION})
    config.validate()
    sample = config.sample
    assert (sample.sampler, sample.steps, sample.block_length, sample.temperature, sample.top_p) == (
        "wino", 32, 8, 0.5, 0.9)
    assert sample.threshold.tau == 0.8 and sample.factor.f == 2.0 and sample.eb.gamma == 0.3
    assert (sample.wino.tau1, sample.wino.tau2, sample.wino.accept_fraction, sample.wino.min_accept,
            sample.wino.max_accept) == (0.4, 0.7, 0.5, 2, 9)
    assert (sample.loop.count, sample.loop.policy, sample.loop.min_count, sample.loop.eps,
            sample.loop.per_token_exit) == (3, "adaptive", 2, 0.1, True)
    assert (sample.num_samples, sample.length, sample.eval_loops) == (3, 40, [1, 2])
    assert sample.flags() == {**SamplerConfig().flags(), **{k: v for k, v in FLAT_SAMPLE_SECTION.items()
                                                            if k in SamplerConfig.FLAGS}}
    # Saved again, the nested form reads back unchanged.
    assert RunConfig.from_dict(config.to_dict()) == config


def test_overrides_take_nested_and_old_flat_keys():
    config = RunConfig()
    apply_overrides(config, ["sample.wino.tau1=0.3", "sample.tau2=0.6", "sample.loop.policy=scheduled",
                             "sample.codd.prior=runs/codd", "sample.codd_gamma=0.25", "sample.threshold=0.5"])
    assert (config.sample.wino.tau1, config.sample.wino.tau2, config.sample.loop.policy) == (0.3, 0.6, "scheduled")
    assert (config.sample.codd.prior, config.sample.codd.gamma, config.sample.threshold.tau) == ("runs/codd", 0.25,
                                                                                                 0.5)
    for bad, message in [("sample.wino=1", "is a group"), ("sample.wino.tua1=1", "did you mean 'sample.wino.tau1'"),
                         ("sample.codd.tau=0", "sample.codd.tau must be > 0")]:
        with pytest.raises(UserError, match=message):
            config = RunConfig()
            apply_overrides(config, [bad])
            config.validate()


def test_flags_fall_back_to_the_checkpoint_config_codd_included():
    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser)
    config = RunConfig()
    apply_overrides(config, ["sample.codd.tau=0.3", "sample.tau1=0.2"])
    spec = sampler_spec_from_args(parser.parse_args(["--codd", "d", "--codd-gamma", "0.4", "--loops", "2"]), config)
    assert (spec.codd.prior, spec.codd.tau, spec.codd.gamma, spec.wino.tau1, spec.loop.count) == ("d", 0.3, 0.4, 0.2,
                                                                                                   2)
    assert config.sample.codd.prior == ""  # the checkpoint's config is not changed


def test_the_builder_chooses_predictors_and_strategies_from_the_config():
    model = make_model()
    wino = build_decoder(model, None, SamplerConfig.from_flags("wino", tau1=0.3, loop_policy="scheduled"), MASK)
    assert isinstance(wino.sequence_predictor(), ShadowBlock) and isinstance(wino.selector(8), WinoSelector)
    assert wino.loops == 3 and isinstance(wino.loop_policy(), ScheduledLoops)  # 0 = the model's S_max
    threshold = build_decoder(model, DiffusionConfig(block_size=4), SamplerConfig.from_flags(
        "threshold", threshold=0.4, loops=2, loop_policy="adaptive"), MASK, context=16)
    assert isinstance(threshold.sequence_predictor(), FullSequencePredictor) and threshold.past_context
    assert isinstance(threshold.block_predictor(), CachedBlockPredictor)
    assert isinstance(threshold.block_selector(4), ThresholdSelector) and threshold.block_selector(4).threshold == 0.4
    assert isinstance(threshold.loop_policy(), AdaptiveLoops) and threshold.loops == 2
    blocks_wino = build_decoder(model, DiffusionConfig(block_size=4), SamplerConfig.from_flags("wino"), MASK)
    assert isinstance(blocks_wino.block_predictor(), ShadowBlock)
    assert isinstance(blocks_wino.block_predictor().inner, CachedBlockPredictor)
    # A block as long as the context is MDLM: prompts are continued on one canvas.
    assert not build_decoder(model, DiffusionConfig(block_size=16), SamplerConfig(), MASK, context=16).past_context


def test_a_canvas_decode_and_a_continuation_agree():
    model = make_model()
    decoder = build_decoder(model, None, SamplerConfig.from_flags("topk", steps=4, loops=2), MASK)
    canvas = prompt_canvas([[5, 6, 7], [8]], 12, MASK, PAD)
    filled = decoder.fill(canvas, torch.Generator().manual_seed(0))
    continued = decoder.continue_prompts([[5, 6, 7], [8]], 9, PAD, generator=torch.Generator().manual_seed(0))
    assert continued.sequences == filled.tokens[:, 3:].tolist()
    assert continued.stats.forward_passes == filled.stats.forward_passes
