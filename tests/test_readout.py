"""Masked-only readout: the model computes logits only where asked, and the objectives that score masked positions
alone (MDLM, block diffusion, per-loop supervision) give the same NELBO and gradients as a full readout."""

import pytest
import torch
from conftest import make_model

from loopdlm.diffusion import LogLinear, MaskedDiffusion
from loopdlm.diffusion.block import BlockDiffusion
from loopdlm.diffusion.loop_supervision import LoopSupervision
from loopdlm.diffusion.masked import SubsNll, subs_log_probs
from loopdlm.eval.likelihood import likelihood_bound
from loopdlm.train.objective import model_logits

VOCAB = 19
MASK = VOCAB - 1


def clean_tokens(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK, (rows, length), generator=torch.Generator().manual_seed(seed))


def full_readout(model, loops):
    """The trainer's call without the readout capability: objectives then select from full logits [B, L, V]."""
    def denoiser(tokens, **inputs):
        output = model(tokens, loops=loops, **inputs)
        return torch.stack(output.loop_logits) if output.loop_logits else output.logits
    return denoiser


def masked_readout(model, loops):
    """What the trainer hands an objective: it reads out only the positions asked for."""
    return model_logits(lambda tokens, **inputs: model(tokens, loops=loops, **inputs))


def terms_and_grads(model, objective, denoiser, x0, noisable, seed=3):
    model.zero_grad(set_to_none=True)
    terms = objective.nelbo(denoiser, x0, torch.Generator().manual_seed(seed), noisable)
    terms.nll_sum.backward()
    return terms, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_terms_and_grads(model, objective, x0, noisable, loops=3):
    full, full_grads = terms_and_grads(model, objective, full_readout(model, loops), x0, noisable)
    masked, masked_grads = terms_and_grads(model, objective, masked_readout(model, loops), x0, noisable)
    assert full.nll_sum > 0
    torch.testing.assert_close(masked.nll_sum, full.nll_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(masked.per_row, full.per_row, rtol=1e-6, atol=1e-6)
    assert torch.equal(masked.n_tokens, full.n_tokens)
    assert full_grads.keys() == masked_grads.keys()
    for name, grad in full_grads.items():
        assert grad.abs().max() > 0, name  # every parameter takes part, so the comparison means something
        torch.testing.assert_close(masked_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def prompt_noisable(x0: torch.Tensor, prompt: int) -> torch.Tensor:
    noisable = torch.ones_like(x0, dtype=torch.bool)
    noisable[:, :prompt] = False
    return noisable


def test_the_model_reads_out_only_the_positions_asked_for():
    model = make_model(vocab_size=VOCAB, loop_norm=True)
    tokens = clean_tokens(3, 10)
    where = torch.rand(3, 10, generator=torch.Generator().manual_seed(1)) < 0.4
    full = model(tokens, loops=3, return_loop_logits=True)
    part = model(tokens, loops=3, return_loop_logits=True, readout_mask=where)
    assert part.logits.shape == (int(where.sum()), VOCAB)
    torch.testing.assert_close(part.logits, full.logits[where], rtol=1e-6, atol=1e-6)
    assert len(part.loop_logits) == 3
    for got, want in zip(part.loop_logits, full.loop_logits):
        torch.testing.assert_close(got, want[where], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prompt", [None, 4])
def test_mdlm_nelbo_and_gradients_equal_the_full_readout(prompt):
    model = make_model(vocab_size=VOCAB, loop_norm=True).train()
    x0 = clean_tokens(4, 12)
    noisable = None if prompt is None else prompt_noisable(x0, prompt)
    assert_same_terms_and_grads(model, MaskedDiffusion(MASK), x0, noisable)


@pytest.mark.parametrize("prompt", [None, 4])
def test_block_diffusion_nelbo_and_gradients_equal_the_full_readout(prompt):
    model = make_model(vocab_size=VOCAB).train()
    x0 = clean_tokens(4, 16)
    noisable = None if prompt is None else prompt_noisable(x0, prompt)
    assert_same_terms_and_grads(model, BlockDiffusion(MASK, 4, 16), x0, noisable)
    assert_same_terms_and_grads(model, BlockDiffusion(MASK, 16, 16), x0, noisable)  # one block: x_t alone


def test_block_losses_equal_the_full_readout():
    model, objective = make_model(vocab_size=VOCAB), BlockDiffusion(MASK, 4, 16)
    x0 = clean_tokens(4, 16)
    noise = objective.add_noise(x0, torch.Generator().manual_seed(0))
    full = objective.block_losses(full_readout(model, 2), x0, noise)
    masked = objective.block_losses(masked_readout(model, 2), x0, noise)
    assert torch.equal(full[1], masked[1])
    torch.testing.assert_close(masked[0], full[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("objective", [MaskedDiffusion(MASK, LogLinear(1e-3)), BlockDiffusion(MASK, 4, 12)])
def test_per_loop_supervision_equals_the_full_readout(objective):
    model = make_model(vocab_size=VOCAB, loop_norm=True).train()
    x0 = clean_tokens(4, 12)
    assert_same_terms_and_grads(model, LoopSupervision(objective, 0.5), x0, prompt_noisable(x0, 3))


def test_held_out_evaluation_reads_out_only_masked_positions():
    model = make_model(vocab_size=VOCAB)
    x0 = clean_tokens(4, 12)
    shares = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: shares.append(float(kwargs["readout_mask"].float().mean())), with_kwargs=True)
    report = likelihood_bound(model, MaskedDiffusion(MASK), [(x0, None)], loops=2, seed=0)
    hook.remove()
    with torch.no_grad():
        expected = MaskedDiffusion(MASK).bound(full_readout(model, 2), x0, torch.Generator().manual_seed(0))
    assert len(shares) == 1 and 0 < shares[0] < 1
    assert report.nats_per_token == pytest.approx(float(expected.loss), rel=1e-6)


def test_flops_count_the_head_at_the_positions_read_out():
    model = make_model(vocab_size=VOCAB, d_model=32)  # 4 layers, core 1-2: the coda is one layer
    d, length = 32, 12
    head, per_layer = 2 * d * VOCAB, 2 * (4 * d * d + 2 * d * 4 * d) + 4 * length * d
    full = model.flops_per_token(length, 2, training=False)
    quarter = model.flops_per_token(length, 2, training=False, readout_fraction=0.25)
    assert full - quarter == pytest.approx(0.75 * head)
    two_more = model.flops_per_token(length, 2, training=False, readouts=2, readout_fraction=0.25)
    assert two_more - quarter == pytest.approx(2 * (per_layer + 0.25 * head))  # each: the coda layer and the head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_subs_nll_equals_log_softmax_and_gather(dtype):
    logits = (torch.randn(7, VOCAB, generator=torch.Generator().manual_seed(0)) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, MASK, (7,), generator=torch.Generator().manual_seed(1))
    weights = torch.rand(7, generator=torch.Generator().manual_seed(2))
    fused = SubsNll.apply(logits, targets, MASK)
    (fused * weights).sum().backward()
    fused_grad, logits.grad = logits.grad, None
    reference = -subs_log_probs(logits, MASK).gather(-1, targets[:, None]).squeeze(-1)
    (reference * weights).sum().backward()
    assert fused.dtype == torch.float32 and fused_grad.dtype == dtype
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to 8 bits either way
    torch.testing.assert_close(fused_grad, logits.grad, rtol=tolerance, atol=tolerance)
    assert float(fused_grad.float()[:, MASK].abs().max()) == 0  # the mask token takes no probability
