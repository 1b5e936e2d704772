"""Shared fixtures: tiny models with perturbed (non-degenerate) weights."""

import os

import pytest
import torch

from loopdlm.models import LoopedTransformer, ModelConfig

# The suite runs tiny tensors, for which extra threads only add contention (and oversubscribe a loaded machine).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # commands run in-process or as subprocesses keep one thread too


def make_model(vocab_size: int = 23, n_layers: int = 4, d_model: int = 32, n_heads: int = 2, core: tuple = (1, 3),
               max_loops: int = 3, seed: int = 0, **kwargs) -> LoopedTransformer:
    """A tiny looped transformer whose weights are scaled up so logits depend visibly on the input."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                         core_start=core[0], core_end=core[1], max_loops=max_loops, **kwargs)
    model = LoopedTransformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@pytest.fixture
def tiny_model() -> LoopedTransformer:
    return make_model()


def with_codd_prior(sampler, prior, folder, window: int, **flags):
    """`sampler` coupled through `prior`, saved as a CoDD layer in `folder` (windows of `window`) as
    `loopdlm train-codd` saves one; `flags` set the other CoDD settings by their flag names (codd_tau, ...)."""
    from loopdlm.sampling.coupling import save_codd_layer

    save_codd_layer(prior, folder, window=window, tokenizer_fingerprint=None)
    return sampler.with_flags(codd=str(folder), **flags)
