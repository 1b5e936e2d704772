"""Behaviours pinned to the reference implementations with hand-computed values on tiny cases.

CoDD coupling and tau (liuanji/CoDD `apply_pc_logits`), the WINO+ loss normalisation, BD3-LM's time range and
clip-interval search (kuleshov-group/bd3lms `_sample_t`, `_clipped_schedule_search`), and the MDLM ancestral and
Fast-dLLM threshold commit rules. Each test fails if its rule is changed.
"""

import math

import pytest
import torch

from loopdlm.config import load_config
from loopdlm.diffusion.block import BlockDiffusion, build_block_objective
from loopdlm.sampling.codd import HMMPrior
from loopdlm.sampling.coupling import AnyOrderCoDDSelector, CoDDTransform
from loopdlm.sampling.engine import WindowPrediction, StepContext, generate
from loopdlm.sampling.selectors import AncestralSelector, FixedScheduleSelector, ThresholdSelector
from loopdlm.train.wino_plus import WinoPlusLossWeights, WinoPlusRows, wino_plus_loss

MASK = 0


def one_state_prior(emission: list[float]) -> HMMPrior:
    """A one-state HMM (so its path is fixed) emitting token v with probability emission[v]."""
    prior = HMMPrior(1, len(emission)).double()
    with torch.no_grad():
        prior.emit_logits.copy_(torch.tensor(emission, dtype=torch.float64).log()[None])
    return prior


def context(confidence: torch.Tensor, step: int = 0, generator: torch.Generator | None = None) -> StepContext:
    """A selector's view of one step where every slot is masked: confidence float [B, W]."""
    rows, width = confidence.shape
    selectable = torch.ones(rows, width, dtype=torch.bool)
    return StepContext(tokens=torch.full((rows, width), MASK), log_probs=torch.zeros(rows, width, 2),
                       candidates=torch.ones(rows, width, dtype=torch.long), confidence=confidence,
                       selectable=selectable, editable=selectable, step=step,
                       window_masked_at_start=selectable.sum(1), generator=generator)


# ------------------------------------------------------------------------------------------------------ CoDD


@pytest.mark.parametrize("temperature,combine_with_sharpened,expected", [
    (0.5, True, [9 / 14, 9 / 28, 1 / 28]),  # q^2 * E = [.072, .036, .004] / .112: the reference
    (2.0, True, [3 / 7, 3 / 7, 1 / 7]),  # tau >= 1 never flattens: q * E = [.12, .12, .04] / .28
    (1.0, True, [3 / 7, 3 / 7, 1 / 7]),
    (0.5, False, [3 / 7, 3 / 7, 1 / 7]),  # the named option: emissions added to the unsharpened q
])
def test_codd_adds_the_emission_to_the_sharpened_q_and_sharpens_only_below_one(temperature, combine_with_sharpened,
                                                                                expected):
    q = torch.tensor([[[0.6, 0.3, 0.1]]], dtype=torch.float64)
    prior = one_state_prior([0.2, 0.4, 0.4])
    option = {} if combine_with_sharpened else {"combine_with_sharpened": False}  # True is the default
    out = CoDDTransform(prior, temperature=temperature, gamma=1.5, **option)(
        q.log(), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(out.exp()[0, 0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


class FixedDenoiser:
    """Returns the same log-probs [1, W, V] for every call."""

    def __init__(self, log_probs: torch.Tensor):
        self.log_probs = log_probs

    def __call__(self, tokens, window, progress):
        return WindowPrediction(self.log_probs[:, window], torch.ones(tokens.shape[0]))

    def begin_window(self, tokens, window):
        pass

    def end_window(self, tokens, window):
        pass


@pytest.mark.parametrize("combine_with_sharpened,first", [(True, 1), (False, 0)])
def test_codd_selector_ranks_slots_by_the_sharpened_coupled_distribution(combine_with_sharpened, first):
    # Unsharpened, slot 0 is the more confident (0.55 > 0.5); at tau = 0.5 slot 1 is (0.25 / 0.375 = 0.667 against
    # 0.3025 / 0.505 = 0.599). The one-state uniform prior adds nothing, so only the sharpening decides.
    probs = torch.tensor([[[0.0, 0.55, 0.45, 0.0], [0.0, 0.5, 0.25, 0.25]]])
    option = {} if combine_with_sharpened else {"combine_with_sharpened": False}  # True is the default
    transform = CoDDTransform(one_state_prior([0.25] * 4).float(), temperature=0.5, gamma=1.5, **option)
    result = generate(FixedDenoiser(probs.log()), torch.full((1, 2), MASK), FixedScheduleSelector(2), MASK,
                      temperature=0.0, transforms=(transform,), record_trace=True)
    after_first_step = result.trace.canvases()[1][0]  # canvases()[0] is the fully masked start
    assert after_first_step[first] == 1 and after_first_step[1 - first] == MASK


@pytest.mark.parametrize("combine_with_sharpened,token", [(True, 1), (False, 2)])
def test_any_order_codd_draws_from_the_sharpened_product_by_default(combine_with_sharpened, token):
    # q * E is proportional to [0, .09, .108, .072] (argmax 2); q^2 * E at tau = 0.5 to [0, .045, .0324, .0144] (1).
    q = torch.tensor([[[0.0, 0.5, 0.3, 0.2]]])
    option = {} if combine_with_sharpened else {"combine_with_sharpened": False}  # True is the default
    selector = AnyOrderCoDDSelector(FixedScheduleSelector(1), one_state_prior([0.1, 0.18, 0.36, 0.36]).float(),
                                    temperature=0.5, gamma=1.5, sampling_temperature=0.0, **option)
    selectable = torch.ones(1, 1, dtype=torch.bool)
    selector.start_window(selectable.sum(1))
    ctx = StepContext(tokens=torch.full((1, 1), MASK), log_probs=q.log(), candidates=torch.ones(1, 1, dtype=torch.long),
                      confidence=torch.full((1, 1), 0.5), selectable=selectable, editable=selectable, step=0,
                      window_masked_at_start=selectable.sum(1), generator=None)
    assert selector.select(ctx).tokens.tolist() == [[token]]


# ------------------------------------------------------------------------------------------------------ WINO+


def entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def test_wino_plus_terms_are_means_over_their_own_slots():
    m = MASK
    # One row, vocab 3 (id 0 = mask): 2 targets (columns 0-1), 3 masked non-targets of the block (columns 2-4).
    rows = WinoPlusRows(inputs=torch.tensor([[m, m, m, m, m]]), clean=torch.tensor([[1, 2, 2, 1, 2]]),
                        targets=torch.tensor([[True, True, False, False, False]]),
                        block=torch.ones(1, 5, dtype=torch.bool))
    probs = torch.tensor([[[0, 0.95, 0.05],  # target, correct and sure
                           [0, 0.3, 0.7],  # target, correct and unsure (0.7 < 0.9)
                           [0, 0.8, 0.2],  # non-target, wrong and confident (0.8 > 0.6)
                           [0, 0.1, 0.9],  # non-target, wrong and confident
                           [0, 0.7, 0.3]]])  # non-target, wrong and confident
    loss = wino_plus_loss(probs.log(), rows, MASK, WinoPlusLossWeights(w_min=0.1, w_max=1.0))
    ce = (-math.log(0.95) - math.log(0.7)) / 2  # over the 2 targets
    sharpening = entropy([0.3, 0.7])  # over the 1 unsure target (not / 2 targets)
    deferral = (entropy([0.8, 0.2]) + entropy([0.1, 0.9]) + entropy([0.7, 0.3])) / 3  # over the 3 confident errors
    assert (loss.unsure_targets, loss.confident_errors) == (1, 3)
    assert loss.ce == pytest.approx(ce, rel=1e-6)
    assert loss.entropy_min == pytest.approx(sharpening, rel=1e-6)
    assert loss.entropy_max == pytest.approx(deferral, rel=1e-6)
    assert float(loss.total) == pytest.approx(ce + 0.1 * sharpening - deferral, rel=1e-6)


def test_wino_plus_term_without_slots_is_zero():
    rows = WinoPlusRows(inputs=torch.tensor([[MASK]]), clean=torch.tensor([[1]]), targets=torch.tensor([[True]]),
                        block=torch.tensor([[True]]))
    loss = wino_plus_loss(torch.tensor([[[0.0, 0.99, 0.01]]]).log(), rows, MASK)
    assert (loss.entropy_min, loss.entropy_max) == (0.0, 0.0)
    assert float(loss.total) == pytest.approx(-math.log(0.99), rel=1e-6)


# ------------------------------------------------------------------------------------------------------ BD3-LM


@pytest.mark.parametrize("preset", ["bd3-tiny-cpu", "bd3lm-small", "bd3lm-small-b8", "bd3lm-small-b4"])
def test_bd3_presets_draw_t_in_the_reference_range_so_weights_stay_at_most_1000(preset):
    config = load_config(preset)
    objective = build_block_objective(config.diffusion, MASK, config.data.seq_len)
    t = objective.sample_times(256, 256, torch.Generator().manual_seed(0), "cpu", (0.0, 1.0))
    assert t.min() >= 1e-3 and t.max() <= 1.0
    assert t.min() < 1e-3 + 1e-4  # the lowest stratum reaches down to the floor
    assert objective.schedule.weight(t).max() <= 1000.0 + 1e-3


@pytest.mark.parametrize("interval,low", [((0.0, 1.0), 1e-3), ((0.5, 1.0), 0.5), ((0.25, 0.75), 0.25)])
def test_bd3_times_are_uniform_on_the_interval_clamped_at_eps(interval, low):
    """t = max(beta, eps) + (omega - max(beta, eps)) u, u stratified (kuleshov-group/bd3lms `_sample_t`)."""
    objective = BlockDiffusion(MASK, 4, eps=1e-3)
    t = objective.sample_times(1, 4, torch.Generator().manual_seed(0), "cpu", interval)
    u = (torch.arange(4) + torch.rand(4, generator=torch.Generator().manual_seed(0))) / 4
    expected = low + (interval[1] - low) * u
    torch.testing.assert_close(t.flatten().sort().values, expected, rtol=0, atol=1e-6)


def test_bd3_masks_with_probability_t_and_weighs_by_one_over_t():
    objective = BlockDiffusion(MASK, 4, 4096, eps=1e-3)
    x0 = torch.randint(1, 5, (1, 4096), generator=torch.Generator().manual_seed(0))
    t = torch.full((1, 1024), 1.0)
    t[0, :512] = 0.25
    noise = objective.add_noise(x0, torch.Generator().manual_seed(1), t=t)
    assert noise.masked[0, 2048:].all()  # t = 1 masks every token (the reference's move chance is t itself)
    assert abs(float(noise.masked[0, :2048].float().mean()) - 0.25) < 0.03
    torch.testing.assert_close(noise.weight[0, :2048], torch.full((2048,), 4.0))
    torch.testing.assert_close(noise.weight[0, 2048:], torch.ones(2048))


class FixedLogits:
    """Block denoiser whose logits ignore the input: p(1) = 2/3, p(2) = 1/3 after SUBS removes the mask."""

    def __call__(self, tokens, position_ids=None, attn_mask=None):
        logits = torch.tensor([0.0, math.log(2.0), 0.0])
        return logits.expand(*tokens.shape, 3)


def test_clip_search_scores_the_variance_of_per_sequence_block_losses_within_each_batch():
    """L' = 1 masks every noisable token with weight 1, so each (sequence, block) loss is its token's NLL:
    log 1.5 for token 1, log 3 for token 2, whatever the candidate interval."""
    objective = BlockDiffusion(MASK, 1, 3, adaptive_clip=True, candidates=[(0.0, 1.0), (0.5, 1.0)])
    first = torch.tensor([[1, 2, 2], [1, 1, 2]])  # losses {a, b, b, a, a, b}: variance 6/5 ((b - a) / 2)^2
    second = (torch.tensor([[2, 2, 1]]), torch.tensor([[False, True, True]]))  # the prompt block is left out: {b, a}
    records = []
    objective.on_validation(FixedLogits(), [first, second], records.append)
    gap = math.log(3.0) - math.log(1.5)
    expected = (6 / 5 * (gap / 2) ** 2 + gap**2 / 2) / 2  # mean over batches of the within-batch variances
    assert records[0]["clip_var[0,1]"] == pytest.approx(expected, rel=1e-6)
    assert records[0]["clip_var[0.5,1]"] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------- commit rules


def test_ancestral_commit_probability_is_alpha_gain_over_masked_mass():
    """Log-linear alpha(t) = 1 - t on a 4-step grid: step 0 (t = 1 -> 0.75) commits with probability
    (0.25 - 0) / (1 - 0) = 1/4, step 1 (0.75 -> 0.5) with (0.5 - 0.25) / (1 - 0.25) = 1/3."""
    selector = AncestralSelector(4)
    confidence = torch.zeros(1, 4000)
    for step, probability in [(0, 1 / 4), (1, 1 / 3)]:
        decision = selector.select(context(confidence, step, torch.Generator().manual_seed(step)))
        draws = torch.rand(1, 4000, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        assert torch.equal(decision.commit, draws < probability)
    assert selector.select(context(confidence, 3, torch.Generator().manual_seed(3))).commit.all()


def test_threshold_commits_every_slot_at_or_above_tau():
    confidence = torch.tensor([[0.91, 0.93, 0.5, 0.96], [0.2, 0.1, 0.3, 0.0]], dtype=torch.float64)
    decision = ThresholdSelector(0.9).select(context(confidence))
    assert decision.commit.tolist() == [[True, True, False, True], [False, False, True, False]]
