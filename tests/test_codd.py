"""CoDD's HMM prior: exact inference checked against brute-force enumeration on a tiny HMM."""

import itertools
import json
import math

import pytest
import torch

from loopdlm.errors import UserError
from loopdlm.sampling.codd import (
    HMMPrior,
    load_prior,
    save_prior,
    sharpen,
    should_couple,
)

N_STATES, VOCAB, WINDOW = 3, 5, 3


@pytest.fixture
def prior() -> HMMPrior:
    torch.manual_seed(0)
    return HMMPrior(N_STATES, VOCAB, init_std=1.0).double()


@pytest.fixture
def window_batch():
    """Four windows: all masked, two mixed patterns, all observed. Returns (log_q, tokens, observed), float64."""
    torch.manual_seed(1)
    log_q = torch.log_softmax(1.5 * torch.randn(4, WINDOW, VOCAB, dtype=torch.float64), dim=-1)
    tokens = torch.randint(0, VOCAB, (4, WINDOW))
    observed = torch.tensor(
        [[False, False, False], [True, False, False], [False, True, False], [True, True, True]]
    )
    mask_id = VOCAB + 7  # masked slots hold an out-of-vocabulary mask id, which must never be read
    return log_q, tokens.masked_fill(~observed, mask_id), observed


# ------------------------------------------------------------------------------------------ brute force


def all_sequences(length: int, size: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(size), repeat=length)))


def brute_path_log_prior(prior: HMMPrior, paths: torch.Tensor) -> torch.Tensor:
    """log p(z) for paths [P, W] -> [P]."""
    log_A = prior.log_A.detach()
    score = prior.log_pi.detach()[paths[:, 0]]
    for i in range(paths.shape[1] - 1):
        score = score + log_A[paths[:, i], paths[:, i + 1]]
    return score


def brute_hmm_log_joint(prior: HMMPrior, sequences: torch.Tensor) -> torch.Tensor:
    """log p_omega(x) for sequences [S, W] -> [S], summing over every hidden path."""
    paths = all_sequences(sequences.shape[1], prior.n_states)
    log_E = prior.log_E.detach()
    emission = sum(log_E[paths[:, i]][:, sequences[:, i]] for i in range(sequences.shape[1]))  # [P, S]
    return torch.logsumexp(brute_path_log_prior(prior, paths)[:, None] + emission, dim=0)


def brute_poe_scores(prior, log_q_row, tokens_row, observed_row, sequences):
    """Unnormalised log p^(x | x_t) of every sequence for one window: [S]."""
    score = brute_hmm_log_joint(prior, sequences)
    for i in range(sequences.shape[1]):
        if observed_row[i]:
            score = score.masked_fill(sequences[:, i] != tokens_row[i], -math.inf)
        else:
            score = score + log_q_row[i, sequences[:, i]]
    return score


# ---------------------------------------------------------------------------------- normaliser, log_prob


def test_log_normalizer_matches_brute_force_product_of_experts(prior, window_batch):
    log_q, tokens, observed = window_batch
    sequences = all_sequences(WINDOW, VOCAB)
    evidence = prior.emission_evidence(log_q, tokens, observed)
    log_z = prior.log_normalizer(evidence)
    for b in range(len(log_q)):
        expected = torch.logsumexp(brute_poe_scores(prior, log_q[b], tokens[b], observed[b], sequences), dim=0)
        assert log_z[b].item() == pytest.approx(expected.item(), abs=1e-10)
    # The backward messages give the same normaliser from the other end of the chain.
    beta = prior.backward_messages(evidence)
    from_beta = torch.logsumexp(prior.log_pi + evidence[:, 0] + beta[:, 0], dim=-1)
    torch.testing.assert_close(from_beta, log_z, rtol=0, atol=1e-10)


def test_log_prob_matches_brute_force_on_mixed_windows(prior, window_batch):
    log_q, tokens, observed = window_batch
    sequences = all_sequences(WINDOW, VOCAB)
    torch.manual_seed(2)
    x0 = torch.where(observed, tokens, torch.randint(0, VOCAB, tokens.shape))
    log_p = prior.log_prob(x0, log_q, observed)
    for b in range(len(log_q)):
        scores = brute_poe_scores(prior, log_q[b], tokens[b], observed[b], sequences)
        index = (sequences == x0[b]).all(dim=-1).nonzero().item()
        expected = scores[index] - torch.logsumexp(scores, dim=0)
        assert log_p[b].item() == pytest.approx(expected.item(), abs=1e-10)
    assert log_p[-1].item() == pytest.approx(0.0, abs=1e-12)  # fully observed: nothing left to predict


def test_log_prob_with_target_mask_marginalises_untargeted_masked_positions(prior, window_batch):
    log_q, tokens, observed = window_batch
    sequences = all_sequences(WINDOW, VOCAB)
    x0 = torch.where(observed, tokens, torch.full_like(tokens, 2))
    target = torch.tensor([True, False, True])  # score positions 0 and 2, sum out position 1
    log_p = prior.log_prob(x0, log_q, observed, target_mask=target.expand_as(observed))
    b = 0  # the all-masked window
    scores = brute_poe_scores(prior, log_q[b], tokens[b], observed[b], sequences)
    matches = (sequences[:, target] == x0[b, target]).all(dim=-1)
    expected = torch.logsumexp(scores[matches], dim=0) - torch.logsumexp(scores, dim=0)
    assert log_p[b].item() == pytest.approx(expected.item(), abs=1e-10)


def test_log_prob_gradients_match_finite_differences(prior, window_batch):
    log_q, tokens, observed = window_batch
    x0 = torch.where(observed, tokens, torch.ones_like(tokens))
    names = ("init_logits", "trans_logits", "emit_logits")
    params = tuple(getattr(prior, name).detach().clone().requires_grad_(True) for name in names)

    def objective(*logits):
        state = dict(zip(names, logits))
        return torch.func.functional_call(prior, state, (x0, log_q, observed))

    assert torch.autograd.gradcheck(objective, params, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ evidence


def naive_soft_evidence(prior: HMMPrior, log_q: torch.Tensor) -> torch.Tensor:
    """logsumexp_v(log_q[b, i, v] + log E[z, v]) through the full [B, W, V, N] tensor."""
    log_E = prior.log_E.detach().to(log_q.dtype)
    return torch.logsumexp(log_q.unsqueeze(-1) + log_E.t(), dim=-2)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 5, 7])
def test_chunked_evidence_equals_unchunked(prior, window_batch, chunk_size):
    log_q, tokens, observed = window_batch
    log_q = log_q.clone()
    log_q[0, 1, 1:3] = -math.inf  # zero-probability tokens, a whole chunk of them when chunk_size is 2
    unchunked = prior.emission_evidence(log_q, tokens, observed, chunk_size=None)
    chunked = prior.emission_evidence(log_q, tokens, observed, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, unchunked, rtol=0, atol=1e-12)
    masked = ~observed
    torch.testing.assert_close(chunked[masked], naive_soft_evidence(prior, log_q)[masked], rtol=0, atol=1e-12)
    torch.testing.assert_close(chunked[observed], prior.log_E.t()[tokens[observed]], rtol=0, atol=0)


def test_zero_probability_chunk_gives_finite_gradients(prior, window_batch):
    log_q, tokens, observed = window_batch
    log_q = log_q.clone()
    log_q[:, :, :2] = -math.inf  # an entire vocabulary chunk has q = 0 everywhere
    x0 = torch.where(observed, tokens, torch.full_like(tokens, 3))
    loss = -prior.log_prob(x0, log_q, observed, chunk_size=2).sum()
    loss.backward()
    for parameter in prior.parameters():
        assert torch.isfinite(parameter.grad).all()
    assert torch.isfinite(loss)


def test_zero_probability_chunk_contributes_exactly_nothing(prior):
    log_q = torch.full((1, 2, VOCAB), -200.0, dtype=torch.float32)  # far below exp's float32 range
    log_q[:, :, :2] = -math.inf
    log_q[:, 1, :] = -math.inf  # the second position has no support at all
    observed = torch.zeros(1, 2, dtype=torch.bool)
    evidence = prior.float().emission_evidence(log_q, torch.zeros(1, 2, dtype=torch.long), observed, chunk_size=2)
    expected = -200.0 + torch.logsumexp(prior.log_E.detach()[:, 2:], dim=-1)
    torch.testing.assert_close(evidence[0, 0], expected, rtol=0, atol=1e-4)
    assert torch.isneginf(evidence[0, 1]).all()


def test_float32_evidence_is_stable_for_sharply_peaked_q(prior):
    torch.manual_seed(3)
    # Sharpening at tau = 0.05 spreads log-probabilities over hundreds of nats; a naive exp would underflow.
    log_q64 = sharpen(torch.randn(2, WINDOW, VOCAB, dtype=torch.float64) * 10, temperature=0.05)
    observed = torch.zeros(2, WINDOW, dtype=torch.bool)
    tokens = torch.zeros(2, WINDOW, dtype=torch.long)
    expected = naive_soft_evidence(prior, log_q64)
    got = prior.float().emission_evidence(log_q64.float(), tokens, observed, chunk_size=2)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


def test_bfloat16_inputs_are_computed_in_float32(prior, window_batch):
    log_q, tokens, observed = window_batch
    evidence = prior.float().emission_evidence(log_q.bfloat16(), tokens, observed, chunk_size=2)
    assert evidence.dtype == torch.float32


# ---------------------------------------------------------------------------------- exact marginals


def test_posterior_token_log_marginals_match_brute_force(prior, window_batch):
    log_q, tokens, observed = window_batch
    sequences = all_sequences(WINDOW, VOCAB)
    marginals = prior.posterior_token_log_marginals(log_q, tokens, observed, chunk_size=2)
    for b in range(len(log_q)):
        scores = brute_poe_scores(prior, log_q[b], tokens[b], observed[b], sequences)
        scores = scores - torch.logsumexp(scores, dim=0)
        for i in range(WINDOW):
            expected = torch.stack(
                [torch.logsumexp(scores[sequences[:, i] == v], dim=0) for v in range(VOCAB)]
            )
            torch.testing.assert_close(marginals[b, i], expected, rtol=0, atol=1e-10)


def test_committing_a_token_via_update_evidence_equals_recomputing(prior, window_batch):
    log_q, tokens, observed = window_batch
    evidence = prior.emission_evidence(log_q, tokens, observed)
    newly = torch.zeros_like(observed)
    newly[0, 2] = newly[1, 1] = True
    committed_tokens = torch.where(newly, torch.full_like(tokens, 4), tokens)
    updated = prior.update_evidence(evidence, committed_tokens, newly)
    now_observed = observed | newly
    torch.testing.assert_close(updated, prior.emission_evidence(log_q, committed_tokens, now_observed))
    cheap = prior.token_log_marginals(updated, log_q, committed_tokens, now_observed)
    full = prior.posterior_token_log_marginals(log_q, committed_tokens, now_observed)
    torch.testing.assert_close(cheap, full, rtol=0, atol=1e-12)
    assert cheap[0, 2, 4].item() == 0.0 and torch.isinf(cheap[0, 2, :4]).all()


# ------------------------------------------------------------------------------------------- sampling


def test_sample_states_matches_brute_force_path_posterior(prior, window_batch):
    log_q, tokens, observed = window_batch
    row = 1  # mixed: one observed, two masked positions
    evidence = prior.emission_evidence(log_q[row : row + 1], tokens[row : row + 1], observed[row : row + 1])
    paths = all_sequences(WINDOW, N_STATES)
    log_weight = brute_path_log_prior(prior, paths) + sum(evidence[0, i, paths[:, i]] for i in range(WINDOW))
    probabilities = torch.softmax(log_weight, dim=0)

    n_samples = 20_000
    generator = torch.Generator().manual_seed(4)
    samples = prior.sample_states(evidence.expand(n_samples, -1, -1), generator)
    codes = (samples * torch.tensor([N_STATES**2, N_STATES, 1])).sum(dim=-1)
    counts = torch.bincount(codes, minlength=len(paths)).double()

    expected = probabilities * n_samples
    frequent = expected >= 5  # pool rare paths into one bin so the chi-square approximation holds
    observed_bins = torch.cat([counts[frequent], counts[~frequent].sum().reshape(1)])
    expected_bins = torch.cat([expected[frequent], expected[~frequent].sum().reshape(1)])
    chi_square = ((observed_bins - expected_bins) ** 2 / expected_bins.clamp_min(1e-12)).sum().item()
    degrees = int(frequent.sum())  # bins - 1
    assert chi_square < degrees + 6 * math.sqrt(2 * degrees)


def test_sample_states_follows_hard_evidence_of_a_deterministic_emission():
    prior = HMMPrior(2, 2).double()
    with torch.no_grad():
        prior.emit_logits.copy_(torch.tensor([[0.0, -1e4], [-1e4, 0.0]]))  # state z emits token z
    tokens = torch.tensor([[0, 1, 1, 0]])
    observed = torch.ones_like(tokens, dtype=torch.bool)
    evidence = prior.emission_evidence(None, tokens, observed)
    assert torch.equal(prior.sample_states(evidence, torch.Generator().manual_seed(0)), tokens)


@pytest.mark.parametrize("temperature,combine_with_sharpened", [(1.0, True), (3.0, True), (0.1, False)])
def test_one_state_uniform_emission_returns_the_factorised_distribution(window_batch, temperature,
                                                                        combine_with_sharpened):
    log_q, tokens, observed = window_batch
    prior = HMMPrior(1, VOCAB).double()
    with torch.no_grad():
        prior.emit_logits.zero_()
    logits = 3.0 * log_q  # unnormalised on purpose: the result must be the renormalised q
    out = prior.coupled_log_probs(logits, tokens, observed, temperature=temperature, generator=torch.Generator(),
                                  combine_with_sharpened=combine_with_sharpened)
    masked = ~observed
    torch.testing.assert_close(out[masked], torch.log_softmax(logits, dim=-1)[masked], rtol=0, atol=1e-12)
    assert torch.equal(out[observed], logits[observed])
    assert torch.equal(out.argmax(-1)[masked], logits.argmax(-1)[masked])


def test_default_adds_emission_to_tempered_q_like_the_reference(window_batch):
    log_q, tokens, observed = window_batch
    prior = HMMPrior(1, VOCAB).double()
    with torch.no_grad():
        prior.emit_logits.zero_()
    out = prior.coupled_log_probs(log_q, tokens, observed, 0.2, torch.Generator())
    masked = ~observed
    torch.testing.assert_close(out[masked], sharpen(log_q, 0.2)[masked], rtol=0, atol=1e-12)


@pytest.mark.parametrize("combine_with_sharpened", [True, False])
def test_coupled_log_probs_adds_emission_of_a_path_sampled_from_sharpened_evidence(prior, window_batch,
                                                                                   combine_with_sharpened):
    log_q, tokens, observed = window_batch
    temperature = 0.3
    sharpened = sharpen(log_q, temperature)
    evidence = prior.emission_evidence(sharpened, tokens, observed, chunk_size=2)
    states = prior.sample_states(evidence, torch.Generator().manual_seed(5))
    base = sharpened if combine_with_sharpened else log_q
    expected = torch.log_softmax(base + prior.log_E.detach()[states], dim=-1)
    out = prior.coupled_log_probs(log_q, tokens, observed, temperature, torch.Generator().manual_seed(5), 2,
                                  combine_with_sharpened)
    masked = ~observed
    torch.testing.assert_close(out[masked], expected[masked], rtol=0, atol=1e-12)
    assert torch.equal(out[observed], log_q[observed])
    assert not out.requires_grad


def test_single_position_window_is_supported(prior):
    log_q = torch.log_softmax(torch.randn(2, 1, VOCAB, dtype=torch.float64), dim=-1)
    observed = torch.zeros(2, 1, dtype=torch.bool)
    tokens = torch.zeros(2, 1, dtype=torch.long)
    # With W = 1 the prior is the mixture sum_z pi(z) E[z, .]; the marginal is q times that, renormalised.
    mixture = torch.logsumexp(prior.log_pi.detach()[:, None] + prior.log_E.detach(), dim=0)
    expected = torch.log_softmax(log_q + mixture, dim=-1)
    torch.testing.assert_close(prior.posterior_token_log_marginals(log_q, tokens, observed), expected)
    assert prior.sample_states(prior.emission_evidence(log_q, tokens, observed)).shape == (2, 1)


def test_sharpen_rejects_non_positive_temperature():
    with pytest.raises(UserError):
        sharpen(torch.zeros(1, 1, 3), 0.0)


def test_should_couple_uses_strict_mask_ratio_threshold_and_gamma_zero_never_activates():
    observed = torch.tensor([[True, True, True, True], [True, True, True, False], [False, False, True, True]])
    assert not should_couple(observed, 0.0).any()
    assert should_couple(observed, 0.3).tolist() == [True, True, False]
    assert should_couple(observed, 0.5).tolist() == [True, True, False]
    assert should_couple(observed, 0.51).tolist() == [True, True, True]


# ---------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip_keeps_weights_and_config(prior, tmp_path, window_batch):
    extra = {"window": 32, "tokenizer_fingerprint": "sha256:placeholder"}
    save_prior(prior, tmp_path / "prior", extra)
    loaded, config = load_prior(tmp_path / "prior")
    assert config == {"n_states": N_STATES, "vocab_size": VOCAB, **extra}
    assert loaded.init_logits.dtype == torch.float64
    for name, tensor in prior.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    log_q, tokens, observed = window_batch
    x0 = torch.where(observed, tokens, torch.zeros_like(tokens))
    torch.testing.assert_close(loaded.log_prob(x0, log_q, observed), prior.log_prob(x0, log_q, observed))


def test_save_rejects_extra_config_contradicting_the_prior(prior, tmp_path):
    with pytest.raises(ValueError):
        save_prior(prior, tmp_path, {"n_states": N_STATES + 1})


def test_load_of_missing_folder_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prior(tmp_path / "nowhere")


def test_load_of_corrupt_or_incomplete_prior_raises_user_error(prior, tmp_path):
    save_prior(prior, tmp_path, {})
    (tmp_path / "codd_config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt CoDD config"):
        load_prior(tmp_path)

    (tmp_path / "codd_config.json").write_text(json.dumps({"n_states": 4, "vocab_size": VOCAB}))
    with pytest.raises(UserError, match="do not match"):
        load_prior(tmp_path)

    (tmp_path / "codd_config.json").write_text(json.dumps({"n_states": N_STATES, "vocab_size": VOCAB}))
    (tmp_path / "hmm_prior.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt CoDD weights"):
        load_prior(tmp_path)

    (tmp_path / "hmm_prior.safetensors").unlink()
    with pytest.raises(UserError, match="has no hmm_prior.safetensors"):
        load_prior(tmp_path)
