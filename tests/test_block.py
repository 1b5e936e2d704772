"""Block diffusion (BD3-LM): mask, per-block noise and loss, KV-cached sampling, arbitrary-length generation."""

import warnings
from dataclasses import dataclass

import pytest
import torch

from conftest import make_model
from loopdlm.diffusion.block import (BlockDiffusion, block_causal_mask, build_block_objective,
                                     dense_block_diffusion_mask, flex_block_diffusion_mask)
from loopdlm.diffusion.masked import DiffusionConfig, MaskedDiffusion
from loopdlm.diffusion.schedules import LogLinear
from loopdlm.errors import UserError
from loopdlm.sampling import SamplerConfig, build_decoder
from loopdlm.sampling.engine import generate
from loopdlm.sampling.kv_cache import CacheOptions, CachedBlockPredictor, UncachedBlockPredictor
from loopdlm.sampling.canvas import block_prompt_canvas
from loopdlm.sampling.long_generation import EosStop, LowEntropyStop, RepetitionStop, generate_long
from loopdlm.sampling.loops import FixedLoops
from loopdlm.sampling.selectors import AncestralSelector, FixedScheduleSelector, ThresholdSelector

MASK, VOCAB = 0, 23


def block_decoder(model, sampler, context=None):
    """A block-diffusion decoder with blocks of 4."""
    return build_decoder(model, DiffusionConfig(block_size=4), sampler, MASK, context=context)



def bound_denoiser(model, loops):
    """The trainer's view of a model: (tokens, position_ids, attn_mask) -> logits, with S bound."""
    return lambda tokens, position_ids=None, attn_mask=None: model(
        tokens, loops=loops, position_ids=position_ids, attn_mask=attn_mask).logits


def clean_tokens(rows, length, seed=0):
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seq_len,block", [(8, 2), (8, 4), (12, 3), (6, 6), (5, 1)])
def test_mask_equals_brute_force_predicate(seq_len, block):
    mask = dense_block_diffusion_mask(seq_len, block, "cpu")[0, 0]
    for q in range(2 * seq_len):
        for k in range(2 * seq_len):
            q_clean, k_clean = q >= seq_len, k >= seq_len
            qb, kb = (q % seq_len) // block, (k % seq_len) // block
            allowed = ((qb == kb and q_clean == k_clean) or (not q_clean and k_clean and kb < qb)
                       or (q_clean and k_clean and kb <= qb))
            assert bool(mask[q, k]) == allowed, (q, k)


def test_flex_block_mask_gives_the_dense_mask_result():
    model = make_model(vocab_size=VOCAB)
    tokens, length = clean_tokens(2, 32), 16
    positions = torch.arange(length).repeat(2)[None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        dense = model(tokens, loops=2, position_ids=positions, attn_mask=dense_block_diffusion_mask(length, 4, "cpu"))
        flex = model(tokens, loops=2, position_ids=positions, attn_mask=flex_block_diffusion_mask(length, 4, "cpu"))
    torch.testing.assert_close(flex.logits, dense.logits, atol=1e-5, rtol=1e-5)


def test_vectorised_loss_equals_per_block_loop():
    model, loops, length, block = make_model(vocab_size=VOCAB), 2, 16, 4
    objective = BlockDiffusion(MASK, block, length)
    x0 = clean_tokens(3, length)
    noise = objective.add_noise(x0, torch.Generator().manual_seed(1))
    vectorised = objective.score(bound_denoiser(model, loops), x0, noise)

    looped_nll = torch.zeros(())
    for b in range(length // block):
        stop = (b + 1) * block
        sequence = torch.cat((x0[:, :b * block], noise.xt[:, b * block:stop]), dim=1)
        columns = torch.arange(stop)
        mask = block_causal_mask(columns, columns, block)[None, None]
        logits = model(sequence, loops=loops, attn_mask=mask).logits[:, -block:]
        log_probs = torch.log_softmax(logits.float().index_fill(-1, torch.tensor([MASK]), float("-inf")), dim=-1)
        nll = -log_probs.gather(-1, x0[:, b * block:stop, None]).squeeze(-1)
        looped_nll = looped_nll + (nll * noise.masked[:, b * block:stop] * noise.weight[:, b * block:stop]).sum()
    assert noise.masked.any() and vectorised.nll_sum > 0
    torch.testing.assert_close(vectorised.nll_sum, looped_nll, rtol=1e-5, atol=1e-5)


def test_clean_tokens_of_block_b_or_later_never_change_block_b_noisy_logits():
    model, length, block = make_model(vocab_size=VOCAB), 16, 4
    objective = BlockDiffusion(MASK, block, length)
    x0 = clean_tokens(2, length)
    xt = objective.add_noise(x0, torch.Generator().manual_seed(0)).xt
    logits = objective.logits(bound_denoiser(model, 2), xt, x0)
    for b in range(length // block):
        changed = x0.clone()
        changed[:, b * block:] = clean_tokens(2, length - b * block, seed=b + 7)
        after = objective.logits(bound_denoiser(model, 2), xt, changed)
        torch.testing.assert_close(after[:, :(b + 1) * block], logits[:, :(b + 1) * block], atol=1e-6, rtol=0)
        if b + 1 < length // block:  # later noisy blocks do see these clean tokens: the model is not degenerate
            assert (after[:, (b + 1) * block:] - logits[:, (b + 1) * block:]).abs().max() > 1e-3


def test_one_block_reproduces_the_mdlm_loss():
    model, length = make_model(vocab_size=VOCAB), 16
    x0 = clean_tokens(4, length)
    t = torch.tensor([0.2, 0.45, 0.7, 0.95])
    denoiser = bound_denoiser(model, 2)
    block = BlockDiffusion(MASK, length, length, eps=1e-3).nelbo(denoiser, x0, torch.Generator().manual_seed(3),
                                                                  t=t[:, None])
    mdlm = MaskedDiffusion(MASK, LogLinear(0.0)).nelbo(denoiser, x0, torch.Generator().manual_seed(3), t=t)
    assert block.nll_sum > 0
    torch.testing.assert_close(block.loss, mdlm.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(block.per_row, mdlm.per_row, rtol=1e-6, atol=0)


def test_block_size_one_masks_every_token_with_unit_weight_giving_the_exact_ar_nll():
    model, objective = make_model(vocab_size=VOCAB), BlockDiffusion(MASK, 1, 12, clip_low=0.5, clip_high=1.0)
    x0 = clean_tokens(2, 12)
    noisable = torch.ones_like(x0, dtype=torch.bool)
    noisable[:, :3] = False
    noise = objective.add_noise(x0, torch.Generator().manual_seed(0), noisable)
    assert torch.equal(noise.masked, noisable) and torch.equal(noise.weight, torch.ones(2, 12))
    losses = [objective.nelbo(bound_denoiser(model, 1), x0, torch.Generator().manual_seed(s)).loss for s in (0, 1)]
    assert losses[0] > 0 and torch.equal(losses[0], losses[1])  # no noise left: the same value for every seed


def test_block_times_are_stratified_over_the_grid_in_random_order():
    objective = BlockDiffusion(MASK, 4, eps=0.0)
    t = objective.sample_times(4, 8, torch.Generator().manual_seed(0), "cpu").flatten()
    strata = (t * 32).floor().long()
    assert sorted(strata.tolist()) == list(range(32))
    assert strata.tolist() != list(range(32))
    clipped = objective.sample_times(4, 8, torch.Generator().manual_seed(0), "cpu", (0.5, 1.0))
    assert clipped.min() >= 0.5 and clipped.max() <= 1.0


@pytest.mark.parametrize("interval", [(0.5, 1.0), (0.25, 0.75), (0.3, 0.8)])
def test_clip_interval_keeps_masked_fraction_of_every_block_inside(interval):
    objective = BlockDiffusion(MASK, 8, 64, clip_low=interval[0], clip_high=interval[1])
    x0 = clean_tokens(64, 64)
    noise = objective.add_noise(x0, torch.Generator().manual_seed(0))
    fraction = noise.masked.view(64, 8, 8).float().mean(dim=-1)
    assert fraction.min() >= interval[0] and fraction.max() <= interval[1]
    assert abs(float(fraction.mean()) - sum(interval) / 2) < 0.05
    noisable = torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) < 0.75
    partial = objective.add_noise(x0, torch.Generator().manual_seed(2), noisable)
    assert not (partial.masked & ~noisable).any()
    counts = noisable.view(64, 8, 8).sum(-1)
    share = partial.masked.view(64, 8, 8).sum(-1) / counts.clamp_min(1)
    has_band = torch.tensor([[any(interval[0] <= k / int(n) <= interval[1] for k in range(int(n) + 1))
                              for n in row] for row in counts])
    assert ((share >= interval[0]) & (share <= interval[1]))[has_band & (counts > 0)].all()
    unclipped = objective.add_noise(x0, torch.Generator().manual_seed(0), unclipped=True)
    assert unclipped.masked.view(64, 8, 8).float().mean(-1).min() < interval[0]


def test_empty_clip_band_is_rejected():
    with pytest.raises(UserError):
        BlockDiffusion(MASK, 4, clip_low=0.3, clip_high=0.45)


def test_validation_switches_to_the_lowest_variance_interval_and_logs_every_choice():
    model = make_model(vocab_size=VOCAB)
    candidates = [(0.0, 1.0), (0.5, 1.0)]
    objective = BlockDiffusion(MASK, 4, 16, adaptive_clip=True, candidates=candidates)
    batches = [clean_tokens(4, 16, seed=s) for s in range(4)]
    records = []
    objective.on_validation(bound_denoiser(model, 2), batches, records.append)
    (record,) = records
    variances = {c: record[f"clip_var[{c[0]:g},{c[1]:g}]"] for c in candidates}
    assert objective.clip == min(variances, key=variances.get)
    assert (record["clip_low"], record["clip_high"]) == objective.clip
    assert variances[(0.0, 1.0)] != variances[(0.5, 1.0)]
    fixed = BlockDiffusion(MASK, 4, 16, clip_low=0.5, clip_high=1.0)
    fixed.on_validation(bound_denoiser(model, 2), batches, records.append)
    assert len(records) == 1 and fixed.clip == (0.5, 1.0)
    resumed = BlockDiffusion(MASK, 4, 16, adaptive_clip=True, candidates=candidates)
    resumed.load_state_dict(fixed.state_dict())
    assert resumed.clip == (0.5, 1.0)


def test_reported_bound_ignores_the_training_interval():
    model = make_model(vocab_size=VOCAB)
    x0 = clean_tokens(3, 16)
    clipped = BlockDiffusion(MASK, 4, 16, clip_low=0.5, clip_high=1.0)
    plain = BlockDiffusion(MASK, 4, 16)
    denoiser = bound_denoiser(model, 1)
    torch.testing.assert_close(clipped.bound(denoiser, x0, torch.Generator().manual_seed(0)).loss,
                               plain.nelbo(denoiser, x0, torch.Generator().manual_seed(0)).loss)


def test_build_block_objective_reads_the_diffusion_config():
    config = DiffusionConfig(block_size=4, clip_low=0.5, clip_high=1.0, adaptive_clip=True, eps=0.0)
    objective = build_block_objective(config, MASK, 16)
    assert (objective.block_size, objective.clip, objective.adaptive_clip) == (4, (0.5, 1.0), True)
    assert build_block_objective(DiffusionConfig(), MASK, 16).block_size == 16
    with pytest.raises(UserError):
        build_block_objective(DiffusionConfig(block_size=5), MASK, 16)
    with pytest.raises(UserError):
        build_block_objective(DiffusionConfig(block_size=4, schedule="cosine"), MASK, 16)


SELECTORS = {"ancestral": lambda: AncestralSelector(3), "topk": lambda: FixedScheduleSelector(2),
             "threshold": lambda: ThresholdSelector(0.2)}


@pytest.mark.parametrize("core,loops", [((0, 0), 1), ((1, 3), 3)])
@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_cached_and_uncached_sampling_give_identical_tokens(core, loops, name):
    model = make_model(vocab_size=VOCAB, core=core, max_loops=loops)
    prompt, padding = block_prompt_canvas([[3, 4, 5, 6, 7], [8, 9]], 4, filler=1)
    canvas = torch.cat((prompt, torch.full((2, 14), MASK)), dim=1)
    padding = torch.cat((padding, torch.zeros(2, 14, dtype=torch.bool)), dim=1)
    results = []
    for make in (CachedBlockPredictor, UncachedBlockPredictor):
        denoiser = make(model, MASK, FixedLoops(loops), 4, padding=padding)
        first = denoiser(canvas, slice(8, 12), 0.0) if make is UncachedBlockPredictor else None
        results.append(generate(denoiser, canvas, SELECTORS[name](), MASK, block_length=4, align_windows=True,
                                generator=torch.Generator().manual_seed(0)))
    cached, uncached = results
    assert (cached.tokens != MASK).all()
    assert torch.equal(cached.tokens, uncached.tokens)
    assert cached.stats.forward_passes == uncached.stats.forward_passes
    assert (first.log_probs[0].exp() - first.log_probs[1].exp()).abs().max() > 1e-2  # rows see different prompts


def test_cached_log_probs_match_recomputation_and_ignore_padding():
    model = make_model(vocab_size=VOCAB)
    canvas = clean_tokens(2, 12)
    canvas[:, 8:] = MASK
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[0, :3] = True
    cached = CachedBlockPredictor(model, MASK, FixedLoops(2), 4, padding=padding)
    cached.begin_window(canvas, slice(8, 12))
    got = cached(canvas, slice(8, 12), 0.0).log_probs
    want = UncachedBlockPredictor(model, MASK, FixedLoops(2), 4, padding=padding)(canvas, slice(8, 12), 0.0).log_probs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    other_pad = canvas.clone()
    other_pad[0, :3] = (canvas[0, :3] + 5) % (VOCAB - 1) + 1
    fresh = CachedBlockPredictor(model, MASK, FixedLoops(2), 4, padding=padding)
    fresh.begin_window(other_pad, slice(8, 12))
    torch.testing.assert_close(fresh(other_pad, slice(8, 12), 0.0).log_probs[0], got[0], atol=1e-5, rtol=0)


def test_reuse_last_loop_stores_core_keys_once():
    model = make_model(vocab_size=VOCAB, core=(1, 3), max_loops=3)
    canvas = torch.cat((clean_tokens(1, 8), torch.full((1, 4), MASK)), dim=1)
    sizes = {}
    for reuse in (False, True):
        denoiser = CachedBlockPredictor(model, MASK, FixedLoops(3), 4, CacheOptions(reuse_last_loop=reuse))
        denoiser.begin_window(canvas, slice(8, 12))
        sizes[reuse] = (len(denoiser.cache), denoiser.cache.nbytes)
        assert denoiser.cache[(1, 2)][0].shape[2] == 8
    assert sizes[False][0] == 2 + 2 * 3 and sizes[True][0] == 2 + 2  # prelude + coda, plus core x loops
    assert sizes[True][1] * 2 == sizes[False][1]


def test_windows_must_be_aligned_blocks():
    model = make_model(vocab_size=VOCAB)
    canvas = torch.cat((clean_tokens(1, 6), torch.full((1, 6), MASK)), dim=1)
    denoiser = CachedBlockPredictor(model, MASK, block_size=4)
    with pytest.raises(UserError):
        generate(denoiser, canvas, FixedScheduleSelector(2), MASK, block_length=4)
    result = generate(CachedBlockPredictor(model, MASK, block_size=4), canvas, FixedScheduleSelector(2), MASK,
                      block_length=4, align_windows=True)
    assert torch.equal(result.tokens[:, :6], canvas[:, :6]) and (result.tokens != MASK).all()


def test_long_generation_equals_plain_cached_generation_within_the_context():
    model = make_model(vocab_size=VOCAB)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    long = generate_long(block_decoder(model, SamplerConfig.from_flags("topk", loops=2)), prompts, max_length=12,
                         steps_per_block=2, generator=torch.Generator().manual_seed(0))
    prompt, padding = block_prompt_canvas(prompts, 4, filler=1)
    canvas = torch.cat((prompt, torch.full((2, 12), MASK)), dim=1)
    denoiser = CachedBlockPredictor(model, MASK, FixedLoops(2), 4,
                                   padding=torch.cat((padding, torch.zeros(2, 12, dtype=torch.bool)), dim=1))
    plain = generate(denoiser, canvas, FixedScheduleSelector(2), MASK, block_length=4, align_windows=True,
                     generator=torch.Generator().manual_seed(0))
    assert long.sequences == plain.tokens[:, 8:].tolist()
    assert long.stop_reasons == ["max_length", "max_length"]
    assert long.stats.forward_passes == plain.stats.forward_passes


def test_generation_longer_than_the_context_slides_the_cache_and_rebases_positions():
    model = make_model(vocab_size=VOCAB, core=(1, 3), max_loops=2)
    result = generate_long(block_decoder(model, SamplerConfig.from_flags("topk", loops=2), context=12),
                           [[3, 4, 5, 6, 7]], max_length=30, steps_per_block=2,
                           generator=torch.Generator().manual_seed(0))
    assert len(result.sequences[0]) == 30 and MASK not in result.sequences[0]
    canvas = torch.cat((clean_tokens(1, 24), torch.full((1, 4), MASK)), dim=1)
    denoiser = CachedBlockPredictor(model, MASK, FixedLoops(2), 4, CacheOptions(context_window=12))
    denoiser.begin_window(canvas, slice(24, 28))
    assert denoiser.cache.length == 8 and denoiser.offset == 16
    assert denoiser.cache.positions.tolist() == [list(range(8))]
    # re-basing moves cached and new positions together: the same logits as the unshifted positions
    shifted = denoiser(canvas, slice(24, 28), 0.0).log_probs
    denoiser.cache.positions = denoiser.cache.positions + 16
    denoiser.offset = 0
    torch.testing.assert_close(denoiser(canvas, slice(24, 28), 0.0).log_probs, shifted, atol=1e-4, rtol=1e-4)


@dataclass
class StopAt:
    """Test criterion: row r stops once it has limits[r] tokens."""

    limits: list
    name: str = "limit"

    def __call__(self, row, generated, new_from):
        return self.limits[row] if len(generated) >= self.limits[row] else None


def test_stop_criteria_end_rows_independently_and_stopped_rows_are_not_generated():
    model = make_model(vocab_size=VOCAB)
    result = generate_long(block_decoder(model, SamplerConfig.from_flags("topk")), [[3], [4, 5], [6]], max_length=20,
                           stop=(StopAt([6, 100, 13]),), steps_per_block=2, generator=torch.Generator().manual_seed(0))
    assert [len(s) for s in result.sequences] == [6, 20, 13]
    assert result.stop_reasons == ["limit", "max_length", "limit"]
    assert result.stats.row_forward_passes.tolist() == [2 * 2, 5 * 2, 4 * 2]  # blocks decoded x steps per block
    assert result.stats.generated_tokens == 39


def test_builtin_stop_criteria():
    assert EosStop(9)(0, [1, 9, 2, 9, 4], new_from=2) == 4
    assert EosStop(9)(0, [1, 9, 2], new_from=2) is None
    assert LowEntropyStop(0.5, window=6)(0, [1, 2, 3, 7, 7, 7, 7, 7, 7], 4) == 9
    assert LowEntropyStop(0.5, window=6)(0, [1, 2, 3, 4, 5, 6, 7, 7], 4) is None
    assert RepetitionStop(ngram=2, count=3)(0, [5, 6, 1, 5, 6, 2, 5, 6], 4) == 8
    assert RepetitionStop(ngram=2, count=3)(0, [5, 6, 1, 5, 6, 2, 6, 5], 4) is None
