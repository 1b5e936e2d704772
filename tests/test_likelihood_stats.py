"""Standard errors of the held-out NELBO and the paired difference between loop counts."""

import math

import pytest
import torch

from loopdlm.diffusion.masked import MaskedDiffusion
from loopdlm.eval.likelihood import LikelihoodReport, likelihood_bound, paired_difference
from tests.conftest import make_model


def report(loops: int, nll: list[float], tokens: list[float]) -> LikelihoodReport:
    return LikelihoodReport(loops=loops, nats_per_token=sum(nll) / sum(tokens), tokens=int(sum(tokens)),
                            batch_nll=nll, batch_tokens=tokens)


def test_standard_error_is_the_ratio_estimator_over_batches():
    r = report(1, [10.0, 14.0, 9.0], [5.0, 6.0, 4.0])
    ratio = 33.0 / 15.0
    residuals = [10 - ratio * 5, 14 - ratio * 6, 9 - ratio * 4]
    expected = math.sqrt(3 / 2 * sum(e * e for e in residuals)) / 15.0
    assert r.standard_error == pytest.approx(expected, rel=1e-12)
    assert math.isnan(report(1, [3.0], [2.0]).standard_error)


def test_paired_difference_cancels_shared_batch_noise():
    base = report(1, [10.0, 20.0, 30.0], [10.0, 10.0, 10.0])
    shifted = report(4, [9.0, 19.0, 29.0], [10.0, 10.0, 10.0])  # every batch exactly 0.1 nats/token better
    difference, error = paired_difference(shifted, base)
    assert difference == pytest.approx(-0.1) and error == pytest.approx(0.0, abs=1e-12)
    assert base.standard_error > 0.5  # while each report on its own varies a lot across batches
    with pytest.raises(ValueError):
        paired_difference(shifted, report(1, [1.0, 2.0], [10.0, 10.0]))


def test_likelihood_bound_records_each_batch_with_the_same_noise_at_every_loop_count():
    torch.manual_seed(0)
    model = make_model(vocab_size=11)
    batches = [(torch.randint(1, 11, (4, 12)), None) for _ in range(3)]
    objective = MaskedDiffusion(mask_id=0)
    one, three = (likelihood_bound(model, objective, batches, loops, seed=5) for loops in (1, 3))
    assert len(one.batch_nll) == 3 and one.batch_tokens == three.batch_tokens  # the same masks at both S
    assert one.nats_per_token == pytest.approx(sum(one.batch_nll) / sum(one.batch_tokens))
    assert one.batch_nll != three.batch_nll
