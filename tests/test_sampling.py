import pytest
import torch

from conftest import make_model
from loopdlm.errors import UserError
from loopdlm.sampling import SamplerConfig, build_decoder, prompt_canvas
from loopdlm.sampling.predictors import FullSequencePredictor
from loopdlm.sampling.engine import generate, gumbel_candidates
from loopdlm.sampling.loops import FixedLoops
from loopdlm.sampling.selectors import AncestralSelector, FixedScheduleSelector, even_split

MASK, PAD = 0, 1
SAMPLERS = ["ancestral", "topk", "random", "threshold"]


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("block_length", [0, 4])
def test_every_sampler_fills_every_slot_and_keeps_the_prompt(name, block_length):
    model = make_model()
    canvas = prompt_canvas([[5, 6, 7], [8]], 14, MASK, PAD)
    spec = SamplerConfig.from_flags(sampler=name, steps=6, block_length=block_length, loops=2)
    result = build_decoder(model, None, spec, MASK).fill(canvas, torch.Generator().manual_seed(0), record_trace=True)
    assert (result.tokens != MASK).all()
    assert torch.equal(result.tokens[:, :3], canvas[:, :3])
    assert result.stats.forward_passes >= 1
    assert result.stats.core_applications.tolist() == [2.0 * p for p in result.stats.row_forward_passes.tolist()]
    canvases = result.trace.canvases()
    assert len(canvases) == len(result.stats.committed_per_step) + 1
    assert torch.equal(canvases[0], canvas) and torch.equal(canvases[-1], result.tokens)
    masks_left = [int((state == MASK).sum()) for state in canvases]
    committed = [before - after for before, after in zip(masks_left, masks_left[1:])]
    assert committed == result.stats.committed_per_step
    assert sum(result.stats.committed_per_step) == int((canvas == MASK).sum())
    # The trace's per-step records agree with the canvases and the decode's accounting.
    steps = result.trace.steps
    assert [int(s.committed.sum()) for s in steps] == result.stats.committed_per_step
    for before, step in zip(canvases, steps):
        assert ((before == MASK) & (step.tokens != MASK)).equal(step.committed)
        assert (step.confidence[step.committed] > 0).all() and (step.confidence[~step.committed] == 0).all()
        assert not step.remasked.any() and (step.loops == 2 or not step.forward_pass)
    assert sum(s.forward_pass for s in steps) == result.stats.forward_passes
    assert torch.equal(sum(s.core_applications for s in steps), result.stats.core_applications)


def test_infilling_keeps_given_tokens_anywhere():
    model = make_model()
    canvas = torch.full((2, 12), MASK)
    canvas[:, 0], canvas[:, 5], canvas[:, 11] = 3, 4, 9
    decoder = build_decoder(model, None, SamplerConfig.from_flags("topk", steps=4, loops=1), MASK)
    result = decoder.fill(canvas, torch.Generator().manual_seed(1))
    assert (result.tokens != MASK).all()
    assert torch.equal(result.tokens[canvas != MASK], canvas[canvas != MASK])


def test_cached_ancestral_skips_forward_passes_but_gives_identical_tokens():
    model = make_model()
    canvas = prompt_canvas([[5]] * 2, 10, MASK, PAD)
    outputs = []
    for reuse in (True, False):
        denoiser = FullSequencePredictor(model, MASK, FixedLoops(2))
        outputs.append(generate(denoiser, canvas, AncestralSelector(64), MASK, reuse_unchanged=reuse,
                                generator=torch.Generator().manual_seed(4)))
    assert torch.equal(outputs[0].tokens, outputs[1].tokens)
    assert outputs[1].stats.forward_passes == len(outputs[1].stats.committed_per_step) > 40
    assert outputs[0].stats.forward_passes < 20  # at most one pass per step that changed x_t (<= 9 slots)


def test_fixed_schedule_commits_even_split_per_step():
    assert [int(even_split(torch.tensor([10]), 4, s)) for s in range(4)] == [3, 3, 2, 2]
    model = make_model()
    canvas = prompt_canvas([[5]], 11, MASK, PAD)
    denoiser = FullSequencePredictor(model, MASK)
    result = generate(denoiser, canvas, FixedScheduleSelector(4), MASK, generator=torch.Generator().manual_seed(0))
    assert result.stats.committed_per_step == [3, 3, 2, 2]


def test_temperature_zero_is_greedy_and_top_p_zero_equals_argmax():
    log_probs = torch.log_softmax(torch.randn(3, 5, 7), dim=-1)
    argmax = log_probs.argmax(-1)
    assert torch.equal(gumbel_candidates(log_probs, 0.0, 1.0, None), argmax)
    assert torch.equal(gumbel_candidates(log_probs, 1.0, 1e-9, torch.Generator().manual_seed(0)), argmax)


def test_gumbel_sampling_matches_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    log_probs = probs.log().expand(20000, 1, 4)
    draws = gumbel_candidates(log_probs, 1.0, 1.0, torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)
    nucleus = gumbel_candidates(log_probs, 1.0, 0.85, torch.Generator().manual_seed(0)).flatten()
    assert set(nucleus.tolist()) == {0, 1}


def test_sampler_never_emits_mask_even_when_model_prefers_it():
    model = make_model()
    with torch.no_grad():
        model.head.weight[MASK] += 100.0
    canvas = prompt_canvas([[5]], 8, MASK, PAD)
    decoder = build_decoder(model, None, SamplerConfig.from_flags("ancestral", steps=4, loops=1), MASK)
    result = decoder.fill(canvas, torch.Generator())
    assert (result.tokens != MASK).all()


def test_bad_sampler_arguments_are_user_errors():
    model = make_model()
    canvas = prompt_canvas([[5]], 8, MASK, PAD)
    with pytest.raises(UserError, match="unknown sampler"):
        build_decoder(model, None, SamplerConfig.from_flags("nope"), MASK).fill(canvas)
    with pytest.raises(UserError, match="no room"):
        prompt_canvas([[5] * 8], 8, MASK, PAD)
    with pytest.raises(UserError, match="nothing to generate"):
        build_decoder(model, None, SamplerConfig.from_flags("topk"), MASK).fill(torch.ones(1, 4, dtype=torch.long))
