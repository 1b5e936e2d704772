"""Sampled tokens for a fixed seed, pinned: a refactor of the sampling code must leave every decode identical.

The expected ids were recorded before the decoder builder replaced the string dispatch (issue 12), on the
paper-recipe stack (no loop-carry norm, the default then); each case goes through the public entry points (plain
canvases, block-diffusion generation, CoDD from a saved layer).
"""

import pytest
import torch

from conftest import make_model
from loopdlm.sampling.codd import HMMPrior
from loopdlm.sampling.coupling import save_codd_layer

MASK, PAD, EOS = 0, 1, 2

PLAIN_CASES = {
    "ancestral": dict(sampler="ancestral", steps=6, loops=2),
    "topk_blocks": dict(sampler="topk", steps=6, block_length=4, loops=2),
    "random_top_p": dict(sampler="random", steps=5, top_p=0.9),
    "threshold": dict(sampler="threshold", threshold=0.2, loops=3),
    "factor": dict(sampler="factor", factor=1.0),
    "eb_blocks": dict(sampler="eb", eb_gamma=0.5, block_length=5),
    "wino_blocks": dict(sampler="wino", tau1=0.3, tau2=0.9, wino_min_accept=2, block_length=8, loops=2),
    "adaptive_per_token": dict(sampler="topk", steps=6, loops=3, loop_policy="adaptive", loop_eps=0.05,
                               per_token_exit=True),
    "scheduled": dict(sampler="threshold", threshold=0.5, loops=3, loop_policy="scheduled", min_loops=1),
    "codd": dict(sampler="topk", steps=6, codd=dict(tau=0.5, gamma=0.9)),
    "codd_any_order": dict(sampler="threshold", threshold=0.3, codd=dict(tau=0.5, gamma=0.9, any_order=True)),
}
BLOCK_CASES = {
    "topk": dict(sampler="topk", steps=6, loops=2),
    "wino": dict(sampler="wino", tau1=0.3, tau2=0.9, wino_min_accept=2, loops=2),
    "threshold_codd": dict(sampler="threshold", threshold=0.3, steps=6, codd=dict(tau=0.5, gamma=0.9)),
}


@pytest.fixture(scope="module")
def codd_folder(tmp_path_factory):
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("codd")
    save_codd_layer(HMMPrior(4, 23), folder, window=8, tokenizer_fingerprint=None)
    return folder


# ------------------------------------------------------------------ the calls (update these when the API moves)
from loopdlm.diffusion.masked import DiffusionConfig  # noqa: E402
from loopdlm.sampling import SamplerConfig, build_decoder  # noqa: E402
from loopdlm.sampling.long_generation import EosStop  # noqa: E402


def _decoder(model, case: dict, codd_folder, block_size=None, context=None):
    case = dict(case)
    codd = case.pop("codd", None)
    sampler = SamplerConfig.from_flags(temperature=1.0, **case)
    if codd is not None:
        sampler = sampler.with_flags(codd=str(codd_folder), codd_tau=codd["tau"], codd_gamma=codd["gamma"],
                                     codd_any_order=codd.get("any_order", False))
    return build_decoder(model, DiffusionConfig(block_size=block_size), sampler, MASK, context=context)


def decode_plain(model, case: dict, codd_folder) -> tuple[list[list[int]], int]:
    result = _decoder(model, case, codd_folder).continue_prompts([[5, 6, 7], [8], [9, 10]], 13, PAD,
                                                                   generator=torch.Generator().manual_seed(0))
    return [[5, 6, 7] + result.sequences[0], [1, 1, 8] + result.sequences[1], [1, 9, 10] + result.sequences[2]], \
        result.stats.forward_passes


def decode_blocks(model, case: dict, codd_folder) -> tuple[list[list[int]], int]:
    result = _decoder(model, case, codd_folder, block_size=4, context=8).continue_prompts(
        [[3], [4, 5, 6, 7, 8], [6]], 12, PAD, stop=(EosStop(EOS),), generator=torch.Generator().manual_seed(0))
    return result.sequences, result.stats.forward_passes
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PLAIN_CASES))
def test_plain_decodes_are_pinned(name, codd_folder):
    tokens, passes = decode_plain(make_model(loop_norm=False), PLAIN_CASES[name], codd_folder)
    assert (tokens, passes) == PLAIN_EXPECTED[name]


@pytest.mark.parametrize("name", sorted(BLOCK_CASES))
def test_block_diffusion_decodes_are_pinned(name, codd_folder):
    sequences, passes = decode_blocks(make_model(loop_norm=False), BLOCK_CASES[name], codd_folder)
    assert (sequences, passes) == BLOCK_EXPECTED[name]


PLAIN_EXPECTED = {'adaptive_per_token': ([[5, 6, 7, 6, 12, 22, 1, 2, 21, 14, 12, 6, 12, 2, 12, 1],
                         [1, 1, 8, 8, 10, 12, 6, 10, 3, 12, 10, 12, 12, 5, 10, 10],
                         [1, 9, 10, 18, 22, 12, 10, 12, 10, 18, 6, 10, 1, 10, 10, 2]],
                        6),
 'ancestral': ([[5, 6, 7, 10, 12, 5, 15, 9, 10, 10, 5, 11, 12, 16, 12, 20],
                [1, 1, 8, 12, 21, 12, 6, 6, 20, 12, 10, 10, 5, 17, 10, 2],
                [1, 9, 10, 14, 12, 21, 10, 16, 10, 1, 2, 6, 7, 10, 10, 3]],
               6),
 'codd': ([[5, 6, 7, 14, 12, 10, 12, 10, 10, 10, 12, 10, 12, 20, 12, 18],
           [1, 1, 8, 5, 21, 12, 10, 10, 5, 12, 10, 12, 12, 14, 10, 10],
           [1, 9, 10, 3, 10, 12, 10, 12, 10, 12, 12, 10, 1, 12, 10, 2]],
          6),
 'codd_any_order': ([[5, 6, 7, 22, 6, 12, 12, 10, 18, 10, 12, 8, 12, 6, 9, 4],
                     [1, 1, 8, 11, 5, 12, 10, 12, 22, 16, 12, 17, 10, 19, 19, 10],
                     [1, 9, 10, 1, 21, 12, 12, 12, 22, 1, 12, 10, 20, 2, 10, 10]],
                    13),
 'eb_blocks': ([[5, 6, 7, 11, 11, 17, 18, 20, 9, 2, 10, 9, 9, 9, 22, 10],
                [1, 1, 8, 10, 10, 10, 14, 22, 17, 7, 14, 5, 14, 20, 2, 10],
                [1, 9, 10, 16, 19, 21, 20, 1, 15, 6, 4, 1, 11, 6, 3, 10]],
               13),
 'factor': ([[5, 6, 7, 10, 6, 11, 12, 12, 10, 10, 12, 10, 12, 12, 6, 2],
             [1, 1, 8, 22, 10, 12, 1, 10, 1, 10, 10, 12, 10, 10, 10, 10],
             [1, 9, 10, 10, 10, 12, 21, 12, 10, 12, 12, 10, 1, 12, 10, 10]],
            13),
 'random_top_p': ([[5, 6, 7, 5, 14, 10, 2, 20, 9, 20, 21, 14, 4, 20, 11, 12],
                   [1, 1, 8, 20, 17, 10, 21, 18, 21, 16, 18, 19, 10, 11, 20, 22],
                   [1, 9, 10, 10, 5, 8, 16, 12, 3, 21, 20, 6, 10, 6, 1, 12]],
                  5),
 'scheduled': ([[5, 6, 7, 1, 10, 11, 12, 12, 10, 10, 10, 12, 10, 18, 12, 12],
                [1, 1, 8, 1, 12, 10, 10, 10, 4, 12, 10, 12, 22, 10, 10, 10],
                [1, 9, 10, 22, 10, 8, 22, 10, 18, 12, 12, 12, 1, 10, 10, 10]],
               13),
 'threshold': ([[5, 6, 7, 10, 6, 11, 12, 12, 10, 10, 12, 10, 12, 12, 6, 2],
                [1, 1, 8, 22, 10, 12, 1, 10, 1, 10, 10, 12, 10, 10, 10, 10],
                [1, 9, 10, 10, 10, 12, 21, 12, 10, 12, 12, 10, 1, 12, 10, 10]],
               13),
 'topk_blocks': ([[5, 6, 7, 3, 12, 17, 2, 10, 20, 8, 12, 22, 6, 19, 1, 16],
                  [1, 1, 8, 9, 10, 10, 5, 21, 4, 18, 22, 22, 1, 12, 11, 20],
                  [1, 9, 10, 2, 12, 16, 12, 5, 10, 12, 6, 1, 20, 4, 7, 19]],
                 4),
 'wino_blocks': ([[5, 6, 7, 10, 15, 6, 12, 10, 10, 12, 2, 10, 12, 1, 22, 10],
                  [1, 1, 8, 10, 4, 5, 5, 10, 10, 6, 1, 10, 12, 10, 22, 10],
                  [1, 9, 10, 10, 8, 10, 6, 6, 10, 6, 20, 2, 1, 1, 3, 3]],
                 13)}
BLOCK_EXPECTED = {'threshold_codd': ([[10, 12, 19, 13, 10, 20, 5, 1, 10, 5, 10, 20], [22, 10, 2],
                     [6, 1, 12, 12, 3, 1, 12, 10, 22, 12, 22, 1]],
                    12),
 'topk': ([[10, 12, 2], [20, 10, 20, 16, 6, 6, 4, 1, 6, 20, 8, 1], [10, 12, 15, 12, 16, 10, 12, 13, 12, 1, 6, 10]],
          6),
 'wino': ([[10, 12, 2], [20, 10, 21, 11, 10, 20, 14, 1, 20, 22, 20, 1], [1, 10, 6, 12, 3, 1, 12, 10, 22, 22, 3, 1]],
          12)}
