"""Fast-dLLM factor rule and EB-sampler: commit counts on hand-made confidence / entropy vectors, and full decodes."""

import math

import pytest
import torch

from loopdlm.models.transformer import LoopedTransformer, ModelConfig
from loopdlm.sampling import SELECTORS, SamplerConfig, build_decoder
from loopdlm.sampling.sampler_config import build_selector
from loopdlm.sampling.engine import StepContext
from loopdlm.sampling.parallel import (
    EntropyBoundedSelector,
    FactorSelector,
    entropy_bounded_commit_count,
    factor_commit_count,
    predictive_entropy,
)

MASK = 0


def context(confidence: torch.Tensor, selectable: torch.Tensor, log_probs: torch.Tensor | None = None) -> StepContext:
    """A StepContext with only what these selectors read filled in meaningfully."""
    batch, width = confidence.shape
    if log_probs is None:
        log_probs = torch.zeros(batch, width, 3)
    return StepContext(tokens=torch.where(selectable, MASK, 5), log_probs=log_probs,
                       candidates=torch.ones(batch, width, dtype=torch.long), confidence=confidence,
                       selectable=selectable, editable=torch.ones_like(selectable), step=0,
                       window_masked_at_start=selectable.sum(dim=1), generator=None)


# ------------------------------------------------------------------------------------------------ factor rule


def test_factor_commits_longest_prefix_satisfying_n_plus_one_times_error_at_most_f():
    # sorted 0.99, 0.8, 0.7, 0.6: (n+1)(1-c) = 0.02, 0.6, 1.2, 2.0 -> the first two pass f = 1.
    confidence = torch.tensor([[0.7, 0.99, 0.6, 0.8]])
    selectable = torch.ones(1, 4, dtype=torch.bool)
    assert factor_commit_count(confidence, selectable, 1.0).tolist() == [2]
    commit = FactorSelector(1.0).select(context(confidence, selectable)).commit
    assert commit.tolist() == [[False, True, False, True]]


def test_factor_boundary_is_inclusive_and_larger_f_commits_more():
    # sorted 0.9, 0.6, 0.5 with f = 2: 0.2, 1.2, and exactly 4 * 0.5 = 2.0 <= 2 -> all three.
    confidence = torch.tensor([[0.9, 0.5, 0.6]], dtype=torch.float64)
    selectable = torch.ones(1, 3, dtype=torch.bool)
    assert factor_commit_count(confidence, selectable, 2.0).tolist() == [3]
    assert factor_commit_count(confidence, selectable, 1.9).tolist() == [2]
    assert factor_commit_count(confidence, selectable, 0.1).tolist() == [1]


def test_factor_always_commits_one_and_ignores_unselectable_slots():
    confidence = torch.tensor([[0.3, 0.2, 0.99], [0.99, 0.99, 0.99], [0.5, 0.5, 0.5]])
    selectable = torch.tensor([[True, True, False], [True, True, False], [False, False, False]])
    commit = FactorSelector(1.0).select(context(confidence, selectable)).commit
    # row 0: 2 * 0.7 > 1 -> only the best selectable slot (0.3), never the unselectable 0.99;
    # row 1: both selectable pass (0.02, 0.03); row 2: nothing to commit.
    assert commit.tolist() == [[True, False, False], [True, True, False], [False, False, False]]


def test_factor_does_not_commit_a_failing_last_slot():
    # The reference also commits the last slot when only it fails; the stated rule does not.
    confidence = torch.tensor([[0.99, 0.99, 0.1]])
    assert factor_commit_count(confidence, torch.ones(1, 3, dtype=torch.bool), 1.0).tolist() == [2]


def test_factor_rejects_non_positive_f():
    with pytest.raises(ValueError):
        FactorSelector(0.0)


# --------------------------------------------------------------------------------------------- entropy bound


def distributions(*probabilities: list[float]) -> torch.Tensor:
    """Log-probs [1, W, 5] of the given distributions over ids 1..4 (id 0, the mask, is at -inf)."""
    rows = [[0.0] + p + [0.0] * (4 - len(p)) for p in probabilities]
    return torch.tensor(rows, dtype=torch.float64).log()[None]


def test_predictive_entropy_matches_closed_form_and_tolerates_minus_inf():
    entropy = predictive_entropy(distributions([1.0], [0.5, 0.5], [0.25] * 4, [0.9, 0.1]))
    expected = [0.0, math.log(2), math.log(4), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
    assert torch.allclose(entropy[0], torch.tensor(expected, dtype=torch.float64))


def test_eb_commits_lowest_entropy_prefix_while_sum_minus_max_within_gamma():
    # entropies: A 0, B ln2 = 0.693, C ln4 = 1.386, D 0.325; sorted A, D, B, C; sum - max = 0, 0, 0.325, 1.018.
    log_probs = distributions([1.0], [0.5, 0.5], [0.25] * 4, [0.9, 0.1])
    selectable = torch.ones(1, 4, dtype=torch.bool)
    entropy = predictive_entropy(log_probs)
    for gamma, count in [(0.0, 2), (0.3, 2), (0.33, 3), (1.0, 3), (1.02, 4)]:
        assert entropy_bounded_commit_count(entropy, selectable, gamma).tolist() == [count], gamma
    commit = EntropyBoundedSelector(0.33).select(context(torch.zeros(1, 4), selectable, log_probs)).commit
    assert commit.tolist() == [[True, True, False, True]]


def test_eb_always_commits_one_and_skips_unselectable_slots():
    # The zero-entropy slot is not selectable, so with gamma = 0 only the lower of ln2 / ln4 is committed.
    log_probs = distributions([1.0], [0.25] * 4, [0.5, 0.5])
    selectable = torch.tensor([[False, True, True]])
    commit = EntropyBoundedSelector(0.0).select(context(torch.zeros(1, 3), selectable, log_probs)).commit
    assert commit.tolist() == [[False, False, True]]
    nothing = torch.zeros(1, 3, dtype=torch.bool)
    assert entropy_bounded_commit_count(predictive_entropy(log_probs), nothing, 1.0).tolist() == [0]


# ------------------------------------------------------------------------------------------------ full decodes


@pytest.fixture(scope="module")
def model() -> LoopedTransformer:
    torch.manual_seed(0)
    net = LoopedTransformer(ModelConfig(vocab_size=10, n_layers=3, d_model=32, n_heads=2, core_start=1,
                                        core_end=2, max_loops=3))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.2)
    return net.eval()


@pytest.mark.parametrize("spec", [SamplerConfig.from_flags(sampler="factor", factor=1.0, temperature=0.0,
                                                           block_length=6),
                                  SamplerConfig.from_flags(sampler="factor", factor=0.05, temperature=1.0),
                                  SamplerConfig.from_flags(sampler="eb", eb_gamma=0.5, temperature=0.0, block_length=5),
                                  SamplerConfig.from_flags(sampler="eb", eb_gamma=0.0, temperature=1.0)])
def test_adaptive_selectors_fill_every_slot_within_one_step_per_slot(model, spec):
    canvas = torch.randint(3, 10, (3, 20))
    canvas[:, 4:] = MASK
    canvas[1, 9] = 7  # a fixed token inside the region stays as it is
    result = build_decoder(model, None, spec, MASK).fill(canvas, generator=torch.Generator().manual_seed(0))
    assert not (result.tokens == MASK).any()
    assert result.tokens[1, 9] == 7 and torch.equal(result.tokens[:, :4], canvas[:, :4])
    assert result.stats.forward_passes <= 16  # at least one commit per row per step
    assert sum(result.stats.committed_per_step) == int((canvas == MASK).sum())


def test_registry_names_factor_and_eb():
    assert {"factor", "eb"} <= set(SELECTORS)
    assert isinstance(build_selector(SamplerConfig.from_flags(sampler="factor", factor=2.5), 8), FactorSelector)
    selector = build_selector(SamplerConfig.from_flags(sampler="eb", eb_gamma=0.7), 8)
    assert isinstance(selector, EntropyBoundedSelector) and selector.gamma == 0.7
