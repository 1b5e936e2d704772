"""CoDD in the sampler (transform and any-order selector), its training objective, and the saved layer."""

import argparse
import math

import pytest
import torch

from conftest import make_model, with_codd_prior
from loopdlm.commands import train_codd
from loopdlm.config import RunConfig
from loopdlm.data.task_source import task_tokenizer
from loopdlm.data.task_spec import get_task
from loopdlm.diffusion.masked import MaskedDiffusion
from loopdlm.diffusion.schedules import LogLinear
from loopdlm.errors import UserError
from loopdlm.models import ModelConfig
from loopdlm.sampling import SamplerConfig, build_decoder, prompt_canvas
from loopdlm.sampling.codd import HMMPrior
from loopdlm.sampling.coupling import (
    AnyOrderCoDDSelector,
    CoDDTransform,
    load_codd_layer,
    save_codd_layer,
    window_chunks,
)
from loopdlm.sampling.engine import WindowPrediction, StepContext, generate, gumbel_candidates
from loopdlm.sampling.selectors import FixedScheduleSelector, ThresholdSelector
from loopdlm.train.checkpoint_files import save_checkpoint
from loopdlm.train.codd_training import (
    CoDDTrainConfig,
    checkpoint_training_source,
    coupled_nelbo,
    densify_topk,
    draw_noisy_batch,
    evaluate_codd,
    factorised_nelbo,
    initial_prior,
    train_codd_from_checkpoint,
    train_codd_prior,
)
from loopdlm.train.trainer import TensorBatchSource
from loopdlm.workflow import build_model, load_pretrained, prepare_data

MASK, PAD = 0, 1

# ------------------------------------------------------------------------ synthetic task: repeated pairs "xx"
# Tokens 1..K; positions (2j, 2j+1) always hold the same token, pairs are independent and uniform.
K, LENGTH = 4, 8
PAIR_VOCAB = K + 1


def pair_rows(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, K + 1, (n, LENGTH // 2), generator=generator).repeat_interleave(2, dim=1)


def oracle_log_probs(tokens: torch.Tensor) -> torch.Tensor:
    """The exact p(x0_i | x_t) of the pair task: the partner's token when it is visible, else uniform: [B, L, V]."""
    partner = tokens.view(tokens.shape[0], -1, 2).flip(-1).reshape(tokens.shape)
    uniform = torch.full((*tokens.shape, PAIR_VOCAB), -math.log(K))
    uniform[..., MASK] = -math.inf
    point = torch.full_like(uniform, -math.inf).scatter(-1, partner.unsqueeze(-1), 0.0)
    return torch.where((partner != MASK).unsqueeze(-1), point, uniform)


class OracleDenoiser:
    """The pair task's exact denoiser as an engine Denoiser."""

    def __call__(self, tokens, window, progress):
        return WindowPrediction(oracle_log_probs(tokens)[:, window], torch.ones(tokens.shape[0]))

    def begin_window(self, tokens, window):
        pass

    def end_window(self, tokens, window):
        pass


def pairs_consistent(tokens: torch.Tensor) -> float:
    """Fraction of rows whose every pair holds one token twice."""
    return (tokens[:, 0::2] == tokens[:, 1::2]).all(dim=1).float().mean().item()


def perfect_pair_prior() -> HMMPrior:
    """Hand-built HMM of the pair task: state v < K emits token v+1 and moves to state K+v (the partner), which
    emits the same token and moves to any first-of-pair state."""
    prior = HMMPrior(2 * K, PAIR_VOCAB)
    with torch.no_grad():
        for logits in (prior.init_logits, prior.trans_logits, prior.emit_logits):
            logits.fill_(-1e4)
        prior.init_logits[:K] = 0.0
        for value in range(K):
            prior.trans_logits[value, K + value] = 0.0
            prior.trans_logits[K + value, :K] = 0.0
            prior.emit_logits[value, value + 1] = prior.emit_logits[K + value, value + 1] = 0.0
    return prior


def uniform_one_state_prior(vocab_size: int) -> HMMPrior:
    prior = HMMPrior(1, vocab_size)
    with torch.no_grad():
        prior.emit_logits.zero_()
    return prior


@pytest.fixture(scope="module")
def trained_pair_prior() -> HMMPrior:
    """A prior trained briefly (100 Adam steps) on the pair task's exact denoiser."""
    source = TensorBatchSource(pair_rows(256, seed=0), batch_size=32, seed=0)
    config = CoDDTrainConfig(n_states=2 * K, window=LENGTH, steps=100, lr=0.3, seed=0)
    return train_codd_prior(oracle_log_probs, source, MaskedDiffusion(MASK, LogLinear()), PAIR_VOCAB, config).prior


# ------------------------------------------------------------------------------- the factorised limit


@pytest.mark.parametrize("sampler,block_length", [("topk", 0), ("threshold", 0), ("ancestral", 4), ("topk", 4)])
@pytest.mark.parametrize("temperature,combine_with_sharpened", [(1.0, True), (0.1, False)])
def test_one_state_uniform_prior_reproduces_the_factorised_sampler_token_for_token(sampler, block_length,
                                                                                   temperature, combine_with_sharpened,
                                                                                   tmp_path):
    """tau >= 1 does not sharpen, and combine_with_sharpened=False couples the unsharpened q: either way a prior
    that carries no information leaves the sampler exactly as it was."""
    model = make_model()
    canvas = prompt_canvas([[5, 6, 7], [8], [9, 10]], 16, MASK, PAD)
    spec = SamplerConfig.from_flags(sampler=sampler, steps=6, block_length=block_length, loops=2, threshold=0.2)
    plain = build_decoder(model, None, spec, MASK).fill(canvas, torch.Generator().manual_seed(3))
    coupled_spec = with_codd_prior(spec, uniform_one_state_prior(model.config.vocab_size), tmp_path, window=16,
                                   codd_tau=temperature, codd_gamma=1.5)
    coupled_spec.codd.combine_with_sharpened = combine_with_sharpened
    coupled = build_decoder(model, None, coupled_spec, MASK).fill(canvas, torch.Generator().manual_seed(3))
    assert torch.equal(coupled.tokens, plain.tokens)
    assert coupled.stats.committed_per_step == plain.stats.committed_per_step


def test_one_state_uniform_prior_transform_is_active_and_returns_the_renormalised_input():
    log_probs = torch.log_softmax(torch.randn(2, 5, 7), dim=-1)
    selectable = torch.tensor([[True, True, False, True, False], [False] * 5])
    tokens = torch.where(selectable, torch.zeros(2, 5, dtype=torch.long), torch.full((2, 5), 3))
    out = CoDDTransform(uniform_one_state_prior(7), temperature=1.0, gamma=1.5)(log_probs, tokens, selectable)
    assert out is not log_probs
    torch.testing.assert_close(out, log_probs, rtol=0, atol=1e-6)


def test_any_order_selector_with_uniform_prior_commits_the_inner_selectors_slots():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(3 * torch.randn(3, 6, 5), dim=-1)
    log_probs[..., MASK] = -math.inf
    tokens = torch.zeros(3, 6, dtype=torch.long)
    tokens[0, 1] = 2
    selectable = tokens == MASK
    candidates = gumbel_candidates(log_probs, 1.0, 1.0, torch.Generator().manual_seed(0))
    confidence = log_probs.gather(-1, candidates[..., None]).squeeze(-1).exp()

    def context():
        return StepContext(tokens=tokens, log_probs=log_probs, candidates=candidates.clone(), confidence=confidence,
                           selectable=selectable, editable=selectable, step=0,
                           window_masked_at_start=selectable.sum(1), generator=None)

    inner = FixedScheduleSelector(3)
    inner.start_window(selectable.sum(1))
    expected = inner.select(context()).commit
    wrapped = AnyOrderCoDDSelector(FixedScheduleSelector(3), uniform_one_state_prior(5), gamma=1.5)
    wrapped.start_window(selectable.sum(1))
    ctx = context()
    decision = wrapped.select(ctx)
    assert torch.equal(decision.commit, expected)
    assert wrapped.steps == 3
    assert (ctx.candidates[decision.commit] != MASK).all()
    assert torch.equal(ctx.candidates[~decision.commit], candidates[~decision.commit])


# ------------------------------------------------------------------------------------------- gating


def test_gamma_zero_never_activates():
    log_probs = torch.log_softmax(torch.randn(2, 4, 5), dim=-1)
    tokens = torch.zeros(2, 4, dtype=torch.long)
    selectable = torch.tensor([[True, False, False, False], [True, True, True, True]])
    prior = perfect_pair_prior().requires_grad_(False)
    assert CoDDTransform(HMMPrior(3, 5), gamma=0.0)(log_probs, tokens, selectable) is log_probs
    canvas = torch.full((64, LENGTH), MASK)
    plain = generate(OracleDenoiser(), canvas, FixedScheduleSelector(2), MASK,
                     generator=torch.Generator().manual_seed(0))
    for transforms, selector in [((CoDDTransform(prior, gamma=0.0),), FixedScheduleSelector(2)),
                                 ((), AnyOrderCoDDSelector(FixedScheduleSelector(2), prior, gamma=0.0))]:
        out = generate(OracleDenoiser(), canvas, selector, MASK, transforms=transforms,
                       generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.tokens, plain.tokens)


def test_coupling_applies_only_to_rows_whose_mask_ratio_is_below_gamma():
    torch.manual_seed(1)
    log_probs = torch.log_softmax(torch.randn(2, 4, PAIR_VOCAB), dim=-1)
    tokens = torch.tensor([[2, 2, 0, 0], [0, 0, 0, 0]])
    selectable = tokens == MASK
    out = CoDDTransform(perfect_pair_prior(), gamma=0.6)(log_probs, tokens, selectable)
    assert torch.equal(out[1], log_probs[1])  # mask ratio 1.0: untouched
    assert not torch.allclose(out[0, 2:], log_probs[0, 2:])  # mask ratio 0.5: coupled
    assert torch.equal(out[0, :2], log_probs[0, :2])  # observed slots are never changed


def test_window_longer_than_the_trained_one_is_coupled_in_consecutive_chunks():
    assert window_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert window_chunks(10, None) == [slice(0, 10)]
    torch.manual_seed(2)
    prior = HMMPrior(3, 6).requires_grad_(False)
    log_probs = torch.log_softmax(torch.randn(2, 10, 6), dim=-1)
    tokens = torch.zeros(2, 10, dtype=torch.long)
    selectable = torch.ones(2, 10, dtype=torch.bool)
    out = CoDDTransform(prior, temperature=0.3, gamma=1.5, window=4, seed=7)(log_probs, tokens, selectable)
    generator = torch.Generator().manual_seed(7)
    for part in window_chunks(10, 4):
        expected = prior.coupled_log_probs(log_probs[:, part], tokens[:, part], ~selectable[:, part], 0.3, generator)
        torch.testing.assert_close(out[:, part], expected, rtol=0, atol=0)


# --------------------------------------------------------------------- coupling fixes correlated pairs


def test_perfect_prior_makes_every_pair_consistent_in_one_step():
    canvas = torch.full((200, LENGTH), MASK)
    prior = perfect_pair_prior()
    factorised = generate(OracleDenoiser(), canvas, FixedScheduleSelector(1), MASK,
                          generator=torch.Generator().manual_seed(0))
    coupled = generate(OracleDenoiser(), canvas, FixedScheduleSelector(1), MASK,
                       transforms=(CoDDTransform(prior, gamma=1.5),), generator=torch.Generator().manual_seed(0))
    any_order = generate(OracleDenoiser(), canvas, AnyOrderCoDDSelector(FixedScheduleSelector(1), prior, gamma=1.5),
                         MASK, generator=torch.Generator().manual_seed(0))
    assert pairs_consistent(factorised.tokens) < 0.1  # (1/4)^4 in expectation
    assert pairs_consistent(coupled.tokens) == 1.0
    assert pairs_consistent(any_order.tokens) == 1.0
    # the coupled samples still cover the pair distribution: every token appears at every position
    assert all(len(coupled.tokens[:, i].unique()) == K for i in range(LENGTH))


def test_briefly_trained_prior_makes_few_step_samples_consistent_far_more_often(trained_pair_prior):
    canvas = torch.full((300, LENGTH), MASK)
    results = {}
    for name, transforms, selector in [
        ("factorised", (), FixedScheduleSelector(2)),
        ("coupled", (CoDDTransform(trained_pair_prior, gamma=1.5),), FixedScheduleSelector(2)),
        ("any_order", (), AnyOrderCoDDSelector(FixedScheduleSelector(2), trained_pair_prior, gamma=1.5)),
    ]:
        out = generate(OracleDenoiser(), canvas, selector, MASK, transforms=transforms,
                       generator=torch.Generator().manual_seed(1))
        results[name] = pairs_consistent(out.tokens)
    assert results["factorised"] < 0.1
    assert results["coupled"] > 0.4
    assert results["any_order"] > 0.2


# ------------------------------------------------------------------------------------------- training


def test_one_state_uniform_prior_objective_equals_the_factorised_nelbo():
    x0 = pair_rows(16, seed=3)
    batch = draw_noisy_batch(oracle_log_probs, x0, None, MaskedDiffusion(MASK, LogLinear()),
                             torch.Generator().manual_seed(0))
    uniform = uniform_one_state_prior(PAIR_VOCAB).double()
    coupled = coupled_nelbo(uniform, batch, window=4)
    torch.testing.assert_close(coupled.double(), factorised_nelbo(batch).double(), rtol=1e-6, atol=1e-6)


def test_training_reduces_the_objective_below_the_factorised_one(trained_pair_prior):
    diffusion = MaskedDiffusion(MASK, LogLinear())

    def held_out():
        return TensorBatchSource(pair_rows(128, seed=9), batch_size=64, seed=0)

    untrained = initial_prior(2 * K, PAIR_VOCAB, init_std=0.5, seed=0)  # where training (seed 0) started
    before = evaluate_codd(untrained, oracle_log_probs, held_out(), diffusion, LENGTH, batches=2)
    after = evaluate_codd(trained_pair_prior, oracle_log_probs, held_out(), diffusion, LENGTH, batches=2)
    assert after["factorised"] == pytest.approx(before["factorised"])
    assert after["coupled"] < before["coupled"] - 0.2
    assert after["coupled"] < after["factorised"] - 0.15


def test_top_k_cache_trains_without_recomputing_the_denoiser():
    calls = []

    def counting_denoiser(tokens):
        calls.append(1)
        return oracle_log_probs(tokens)

    source = TensorBatchSource(pair_rows(128, seed=0), batch_size=16, seed=0)
    config = CoDDTrainConfig(n_states=2 * K, window=LENGTH, steps=40, lr=0.3, topk=2, pool_batches=4)
    result = train_codd_prior(counting_denoiser, source, MaskedDiffusion(MASK, LogLinear()), PAIR_VOCAB, config)
    assert len(calls) == result.frozen_passes == 4
    first, last = (sum(h[1] for h in part) / 10 for part in (result.history[:10], result.history[-10:]))
    assert last < first - 0.1


def test_densify_topk_spreads_the_leftover_mass_and_is_exact_for_full_k():
    log_probs = torch.log_softmax(torch.randn(3, 7), dim=-1)
    log_probs[:, MASK] = -math.inf
    log_probs = torch.log_softmax(log_probs, dim=-1)
    top = log_probs.topk(2, dim=-1)
    dense = densify_topk(top.values, top.indices, 7, MASK)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(dense.gather(-1, top.indices), top.values)
    assert torch.isneginf(dense[:, MASK]).all()
    others = torch.ones_like(dense, dtype=torch.bool).scatter(-1, top.indices, False)
    others[:, MASK] = False
    leftover = 1 - top.values.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(dense.exp()[others].view(3, 4), (leftover / 4).expand(3, 4))
    full = log_probs.topk(6, dim=-1)
    torch.testing.assert_close(densify_topk(full.values, full.indices, 7, MASK), log_probs)


# ---------------------------------------------------------------------------------------- persistence


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A run folder with one checkpoint of a tiny model trained on nothing, over a tiny text corpus."""
    return make_tiny_checkpoint(tmp_path)


def make_tiny_checkpoint(tmp_path):
    """(run folder, tokenizer) of `tiny_checkpoint`, made in the folder `tmp_path`."""
    text = tmp_path / "corpus.txt"
    text.write_text("abcab cabba " * 40)
    config = RunConfig()
    config.data.source, config.data.seq_len, config.data.cache_dir = f"text:{text}", 16, str(tmp_path / "cache")
    config.model = ModelConfig(n_layers=2, d_model=16, n_heads=2, core_start=0, core_end=1, max_loops=2)
    corpus = prepare_data(config.data)
    model = build_model(config.model, corpus.tokenizer.vocab_size)
    config.model = model.config
    save_checkpoint(tmp_path / "run", 1, model_state=model.state_dict(), ema_state=None,
                    training_state={"step": 1}, config=config, tokenizer_saver=corpus.tokenizer.save)
    return tmp_path / "run", corpus.tokenizer


def test_train_codd_command_saves_a_layer_that_loads_beside_the_checkpoint(tiny_checkpoint, tmp_path):
    run_dir, tokenizer = tiny_checkpoint
    parser = argparse.ArgumentParser()
    train_codd.register(parser.add_subparsers())
    out = tmp_path / "codd"
    args = parser.parse_args(["train-codd", "--checkpoint", str(run_dir), "--out", str(out), "--states", "3",
                              "--window", "8", "--steps", "3", "--batch-size", "4", "--topk", "2",
                              "--pool-batches", "2", "--device", "cpu"])
    args.func(args)
    loaded = load_pretrained(run_dir)
    prior, config = load_codd_layer(out, loaded.model.config.vocab_size, tokenizer.fingerprint())
    assert (config["n_states"], config["window"], config["vocab_size"]) == (3, 8, tokenizer.vocab_size)
    assert config["tokenizer_fingerprint"] == tokenizer.fingerprint() and config["loops"] == 2
    canvas = prompt_canvas([tokenizer.encode("ab")], 12, tokenizer.mask_id, tokenizer.pad_id)
    sampler = SamplerConfig.from_flags("topk", steps=3, codd=str(out), codd_gamma=1.5)
    result = build_decoder(loaded.model, None, sampler, tokenizer.mask_id,
                           tokenizer_fingerprint=tokenizer.fingerprint()).fill(canvas)
    assert (result.tokens != tokenizer.mask_id).all()


def test_task_checkpoint_trains_its_prior_on_the_task_answers(tmp_path):
    task = get_task("add:digits=1")
    tokenizer = task_tokenizer(task)
    config = RunConfig()
    config.data.task, config.data.seq_len = "add:digits=1", task.prompt_length + task.answer_length
    config.model = ModelConfig(n_layers=2, d_model=16, n_heads=2)
    model = build_model(config.model, tokenizer.vocab_size)
    config.model = model.config
    save_checkpoint(tmp_path / "run", 1, model_state=model.state_dict(), ema_state=None,
                    training_state={"step": 1}, config=config, tokenizer_saver=tokenizer.save)
    settings = CoDDTrainConfig(n_states=2, window=task.answer_length, steps=2, topk=0)
    x0, noisable = checkpoint_training_source(config, tokenizer, 4, settings).next_batch()
    assert x0.shape == (4, config.data.seq_len)
    assert noisable[:, task.prompt_length:].all() and not noisable[:, :task.prompt_length].any()
    result = train_codd_from_checkpoint(tmp_path / "run", tmp_path / "codd", settings, batch_size=4, device="cpu",
                                        log=lambda line: None)
    assert len(result.history) == 2
    assert load_codd_layer(tmp_path / "codd", tokenizer.vocab_size, tokenizer.fingerprint())[1]["loops"] == 1


def test_loading_a_layer_for_another_vocabulary_or_tokenizer_is_a_user_error(tmp_path):
    save_codd_layer(HMMPrior(2, 9), tmp_path / "codd", window=4, tokenizer_fingerprint="aaaa")
    with pytest.raises(UserError, match="vocabulary of 9 ids but the model has 10"):
        load_codd_layer(tmp_path / "codd", vocab_size=10)
    with pytest.raises(UserError, match="different tokenizer"):
        load_codd_layer(tmp_path / "codd", vocab_size=9, tokenizer_fingerprint="bbbb")
    prior, config = load_codd_layer(tmp_path / "codd", vocab_size=9, tokenizer_fingerprint="aaaa")
    assert prior.n_states == 2 and config["window"] == 4


def test_bad_coupling_options_are_user_errors():
    with pytest.raises(UserError):
        CoDDTransform(HMMPrior(2, 5), temperature=0.0)
    with pytest.raises(UserError):
        CoDDTransform(HMMPrior(2, 5), gamma=-0.1)
    with pytest.raises(UserError):
        AnyOrderCoDDSelector(ThresholdSelector(), HMMPrior(2, 5), window=0)
    with pytest.raises(UserError):
        CoDDTrainConfig(n_states=0).validate()
