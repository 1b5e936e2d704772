"""Attention analysis: recomputed weights equal what SDPA used; masked/unmasked key mass per query and layer loop."""

import pytest
import torch

from conftest import make_model
from loopdlm.eval.attention import analyze_attention, attention_probabilities, key_mass

MASK_ID = 0


def _capture_attention(model, tokens, loops, attn_mask=None):
    """(module, input x, position ids, mask, output) of every attention call in one forward pass."""
    calls = []

    def hook(module, args, output):
        calls.append((module, args[0], args[1], args[2], output[0]))

    handles = [layer.attn.register_forward_hook(hook) for layer in model.layers]
    with torch.no_grad():
        model(tokens, loops=loops, attn_mask=attn_mask)
    for handle in handles:
        handle.remove()
    return calls


@pytest.mark.parametrize("causal", [False, True])
def test_recomputed_attention_weights_reproduce_the_sdpa_output(causal):
    model = make_model()
    tokens = torch.randint(1, 23, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] if causal else None
    calls = _capture_attention(model, tokens, loops=2, attn_mask=mask)
    assert len(calls) == 1 + 2 * 2 + 1
    for attn, x, position_ids, attn_mask, output in calls:
        probs = attention_probabilities(attn, x, position_ids, attn_mask)
        _, _, v = attn.qkv(x).view(2, 7, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        mixed = (probs @ v).transpose(1, 2).reshape(2, 7, -1)
        torch.testing.assert_close(attn.out(mixed), output, atol=1e-5, rtol=1e-4)
        if causal:
            assert probs.triu(diagonal=1).abs().max() == 0


def test_masked_and_unmasked_key_mass_sum_to_one_per_query():
    probs = torch.tensor([[[[0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]])
    masked = torch.tensor([[True, False, True]])
    masked_mass, unmasked_mass, self_mass = key_mass(probs, masked)
    torch.testing.assert_close(masked_mass[0, 0], torch.tensor([0.8, 0.9, 2 / 3]))
    torch.testing.assert_close(unmasked_mass[0, 0], torch.tensor([0.2, 0.1, 1 / 3]))
    torch.testing.assert_close(self_mass[0, 0], torch.tensor([0.5, 0.1, 1 / 3]))

    model = make_model()
    tokens = torch.randint(1, 23, (3, 9), generator=torch.Generator().manual_seed(1))
    masked = torch.rand(3, 9, generator=torch.Generator().manual_seed(2)) < 0.5
    for attn, x, position_ids, attn_mask, _ in _capture_attention(model, tokens, loops=3):
        masked_mass, unmasked_mass, _ = key_mass(attention_probabilities(attn, x, position_ids, attn_mask), masked)
        torch.testing.assert_close(masked_mass + unmasked_mass, torch.ones_like(masked_mass))


def test_analysis_reports_every_layer_loop_at_every_noise_level():
    model = make_model()
    x0 = torch.randint(1, 23, (4, 12), generator=torch.Generator().manual_seed(3))
    noisable = torch.ones_like(x0, dtype=torch.bool)
    noisable[:, :4] = False  # a visible prompt
    records = analyze_attention(model, [(x0, noisable)], MASK_ID, times=[0.3, 0.9], loops=3, seed=0)
    for t in (0.3, 0.9):
        rows = [r for r in records if r.t == t]
        assert [(r.layer, r.loop) for r in rows] == [(0, 0), (1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3), (3, 0)]
        assert [r.depth for r in rows] == list(range(8))
        assert all(r.masked_mass + r.unmasked_mass == pytest.approx(1.0, abs=1e-5) for r in rows)
        assert all(0 < r.masked_key_fraction <= 8 / 12 and r.queries == rows[0].queries for r in rows)
    low, high = (next(r for r in records if r.t == t) for t in (0.3, 0.9))
    assert high.masked_key_fraction > low.masked_key_fraction and high.queries > low.queries
    assert not any(layer.attn._forward_pre_hooks for layer in model.layers)  # hooks are removed afterwards
    assert records == analyze_attention(model, [(x0, noisable)], MASK_ID, times=[0.3, 0.9], loops=3, seed=0)
