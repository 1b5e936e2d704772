import math

import torch

from loopdlm.diffusion import Cosine, LogLinear, MaskedDiffusion, subs_log_probs
from loopdlm.diffusion.schedules import stratified_times

MASK = 0


class RecordingDenoiser:
    """Returns fixed logits and remembers the noisy input it was given."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.seen = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seen = tokens.clone()
        return self.logits.clone()


def test_nelbo_matches_hand_computed_value():
    # vocabulary: 0 = mask, 1, 2; the model puts a huge logit on the mask token, which SUBS must ignore
    logits = torch.log(torch.tensor([[[9.0, 0.25, 0.75], [9.0, 0.5, 0.5], [9.0, 0.9, 0.1]]])).repeat(2, 1, 1)
    logits[..., MASK] = 50.0
    x0 = torch.tensor([[1, 2, 1], [2, 2, 1]])
    t = torch.tensor([0.5, 0.8])
    objective = MaskedDiffusion(MASK, LogLinear(eps=0.0))
    denoiser = RecordingDenoiser(logits)
    terms = objective.nelbo(denoiser, x0, torch.Generator().manual_seed(3), t=t)
    probs = {(0, 1): 0.25, (0, 2): 0.75, (1, 1): 0.5, (1, 2): 0.5, (2, 1): 0.9, (2, 2): 0.1}
    expected_rows = []
    for row in range(2):
        total = sum(-math.log(probs[(i, int(x0[row, i]))]) for i in range(3) if denoiser.seen[row, i] == MASK)
        expected_rows.append(total / float(t[row]) / 3)
    assert (denoiser.seen == MASK).any()
    assert torch.equal(denoiser.seen[denoiser.seen != MASK], x0[denoiser.seen != MASK])
    torch.testing.assert_close(terms.per_row, torch.tensor(expected_rows))
    torch.testing.assert_close(terms.loss, torch.tensor(sum(expected_rows) / 2))


def test_unmasked_positions_contribute_nothing_and_all_masked_at_t_one():
    logits = torch.randn(1, 4, 5)
    x0 = torch.tensor([[1, 2, 3, 4]])
    objective = MaskedDiffusion(MASK, LogLinear(eps=0.0))
    full = objective.nelbo(RecordingDenoiser(logits), x0, None, t=torch.tensor([1.0]))
    log_probs = subs_log_probs(logits, MASK)
    expected = -log_probs[0, torch.arange(4), x0[0]].sum() / 4
    torch.testing.assert_close(full.loss, expected)
    none = objective.nelbo(RecordingDenoiser(logits), x0, None, t=torch.tensor([1e-9]))
    assert none.loss == 0


def test_subs_never_predicts_mask():
    log_probs = subs_log_probs(torch.randn(2, 3, 6), MASK)
    assert torch.isneginf(log_probs[..., MASK]).all()
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 3))


def test_noisable_mask_keeps_prompt_clean_and_normalises_by_answer_tokens():
    x0 = torch.randint(1, 5, (4, 6))
    noisable = torch.zeros(4, 6, dtype=torch.bool)
    noisable[:, 4:] = True
    denoiser = RecordingDenoiser(torch.randn(4, 6, 5))
    terms = MaskedDiffusion(MASK, LogLinear(0.0)).nelbo(denoiser, x0, None, noisable=noisable,
                                                        t=torch.ones(4))
    assert torch.equal(denoiser.seen[:, :4], x0[:, :4])
    assert (denoiser.seen[:, 4:] == MASK).all()
    assert terms.n_tokens == 8


def test_loglinear_weight_is_minus_alpha_prime_over_one_minus_alpha():
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64, requires_grad=True)
    for schedule in (LogLinear(1e-3), Cosine(1e-3)):
        alpha = schedule.alpha(t)
        (grad,) = torch.autograd.grad(alpha.sum(), t)
        torch.testing.assert_close(schedule.weight(t), -grad / (1 - alpha))
    torch.testing.assert_close(LogLinear(1e-3).weight(t), 1 / t)


def test_stratified_times_cover_one_stratum_each():
    t = stratified_times(8, 0.0, torch.Generator().manual_seed(0), "cpu")
    strata = (t * 8).floor()
    assert strata.tolist() == list(range(8))
    lifted = stratified_times(8, 0.1, torch.Generator().manual_seed(0), "cpu")
    torch.testing.assert_close(lifted, 0.1 + 0.9 * t)
