"""KV-cached autoregressive generation with the causal judge architecture reproduces uncached generation."""

import pytest
import torch

from conftest import make_model
from loopdlm.errors import UserError
from loopdlm.sampling.autoregressive import generate_autoregressive
from loopdlm.models.layers import causal_mask


def _causal_model(core=(0, 0), max_loops=1):
    return make_model(vocab_size=29, n_layers=3, d_model=32, core=core, max_loops=max_loops, seed=3)


@pytest.mark.parametrize("core,loops", [((0, 0), 1), ((1, 2), 3)])
def test_cached_generation_gives_the_tokens_of_uncached_generation(core, loops):
    model = _causal_model(core, max_loops=loops)
    prompt = torch.randint(0, 29, (3, 5), generator=torch.Generator().manual_seed(0))
    runs = [generate_autoregressive(model, prompt, 20, generator=torch.Generator().manual_seed(7), use_cache=cached,
                                    loops=loops) for cached in (True, False)]
    cached, uncached = runs
    assert torch.equal(cached.tokens[:, :5], prompt)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert cached.stats.generated_tokens == 60 and cached.stats.forward_passes == 20
    # sampled at temperature 1, not a degenerate constant continuation
    assert len(set(cached.tokens[:, 5:].flatten().tolist())) > 5


def test_greedy_generation_follows_the_causal_argmax_step_by_step():
    model = _causal_model()
    prompt = torch.tensor([[4, 9, 1]])
    tokens = generate_autoregressive(model, prompt, 6, temperature=0.0).tokens
    for end in range(3, 9):
        logits = model(tokens[:, :end], attn_mask=causal_mask(end, "cpu")).logits[:, -1]
        assert int(tokens[0, end]) == int(logits.argmax())


def test_bad_prompt_or_length_is_a_user_error():
    model = _causal_model()
    with pytest.raises(UserError):
        generate_autoregressive(model, torch.zeros(2, 0, dtype=torch.long), 4)
    with pytest.raises(UserError):
        generate_autoregressive(model, torch.zeros(2, 3, dtype=torch.long), 0)
