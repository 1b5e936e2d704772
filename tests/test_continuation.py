"""Continuation likelihoods: the stratified Monte-Carlo ELBO against the exact ELBO by enumeration (MDLM and block
diffusion), the deterministic chain rule against a step-by-step decode, batching with padding, rolling windows;
and prompt continuation with stop strings."""

import itertools

import pytest
import torch

from conftest import make_model
from loopdlm.data.tokenizers import CharTokenizer
from loopdlm.diffusion.block import block_causal_mask
from loopdlm.diffusion.masked import DiffusionConfig, subs_log_probs
from loopdlm.errors import UserError
from loopdlm.eval.continuation import ContinuationScorer
from loopdlm.eval.generation import cut_at_stop_strings, generate_continuations
from loopdlm.sampling import SamplerConfig, build_decoder

MASK = 0
PROMPT, CONTINUATION = [5, 9, 4], [7, 3, 11, 6]


@torch.no_grad()
def log_prob_of(model, tokens, positions, attn_mask=None, loops=2):
    """Sum of log p(tokens[i] | tokens) over `positions`, tokens a plain list (mask ids where masked)."""
    x = torch.tensor([tokens])
    log_probs = subs_log_probs(model(x, loops=loops, attn_mask=attn_mask).logits, MASK)[0]
    return sum(float(log_probs[i, tokens_i]) for i, tokens_i in positions)


def exact_elbo(model, x0, groups, block_size=None, loops=2):
    """sum over groups of sum_l f(l) / l, f(l) the mean over every l-subset M of the group of the log-probs of M
    with M masked; a block group sees only the clean blocks before it (the sampler's prefix + block layout)."""
    total = 0.0
    for group in groups:
        end = group[-1] + 1
        if block_size is not None:
            end = -(-end // block_size) * block_size
            end = min(end, len(x0))
            columns = torch.arange(end)
            attn_mask = block_causal_mask(columns, columns, block_size)[None, None]
        else:
            attn_mask = None
        for count in range(1, len(group) + 1):
            subsets = list(itertools.combinations(group, count))
            mean = 0.0
            for subset in subsets:
                xt = [MASK if i in subset else t for i, t in enumerate(x0[:end])]
                mean += log_prob_of(model, xt, [(i, x0[i]) for i in subset], attn_mask, loops) / len(subsets)
            total += mean / count
    return total


@pytest.mark.parametrize("block_size", [None, 2])
def test_mc_elbo_mean_matches_the_exact_elbo_by_enumeration(block_size):
    model = make_model(vocab_size=13)
    x0 = PROMPT + CONTINUATION
    positions = list(range(len(PROMPT), len(x0)))
    if block_size is None:
        groups = [positions]
    else:
        groups = [[p for p in positions if p // block_size == b] for b in sorted({p // block_size for p in positions})]
    exact = exact_elbo(model, x0, groups, block_size)
    scorer = ContinuationScorer(model, MASK, context=16, loops=2, block_size=block_size, batch_rows=64)
    score, = scorer.elbo([(PROMPT, CONTINUATION)], samples=256, generator=torch.Generator().manual_seed(0))
    assert score.stderr > 0 and score.tokens == len(CONTINUATION)
    assert abs(score.log_likelihood - exact) < 3 * score.stderr, (score, exact)
    # fewer samples: a wider error bar around the same value
    small, = scorer.elbo([(PROMPT, CONTINUATION)], samples=16, generator=torch.Generator().manual_seed(1))
    assert small.stderr > score.stderr and abs(small.log_likelihood - exact) < 4 * small.stderr


def test_chain_rule_is_the_left_to_right_decode_and_batching_pads_without_changing_it():
    model = make_model(vocab_size=13)
    x0 = PROMPT + CONTINUATION
    expected, greedy = 0.0, True
    for position in range(len(PROMPT), len(x0)):
        xt = x0[:position] + [MASK] * (len(x0) - position)
        with torch.no_grad():
            log_probs = subs_log_probs(model(torch.tensor([xt]), loops=2).logits, MASK)[0, position]
        expected += float(log_probs[x0[position]])
        greedy &= int(log_probs.argmax()) == x0[position]
    scorer = ContinuationScorer(model, MASK, context=16, loops=2, batch_rows=3)
    other = ([8], [3, 3])
    alone, = scorer.chain_rule([(PROMPT, CONTINUATION)])
    batched = scorer.chain_rule([other, (PROMPT, CONTINUATION), other])
    assert alone.stderr == 0 and alone.greedy == greedy
    assert alone.log_likelihood == pytest.approx(expected, abs=1e-5)
    assert batched[1].log_likelihood == pytest.approx(expected, abs=1e-5)
    assert batched[0].log_likelihood == pytest.approx(scorer.chain_rule([other])[0].log_likelihood, abs=1e-5)
    assert scorer.stats.forward_passes > 0 and scorer.stats.core_applications == 2 * scorer.stats.rows


def test_block_chain_rule_scores_each_block_given_the_clean_blocks_before_it():
    model = make_model(vocab_size=13)
    x0 = PROMPT + CONTINUATION
    block = 2
    expected = 0.0
    for position in range(len(PROMPT), len(x0)):
        end = min(-(-(position + 1) // block) * block, len(x0))
        xt = x0[:position] + [MASK] * (end - position)
        columns = torch.arange(end)
        expected += log_prob_of(model, xt, [(position, x0[position])],
                                block_causal_mask(columns, columns, block)[None, None])
    scorer = ContinuationScorer(model, MASK, context=16, loops=2, block_size=block)
    score, = scorer.chain_rule([(PROMPT, CONTINUATION)])
    assert score.log_likelihood == pytest.approx(expected, abs=1e-5)
    assert scorer.stats.rows == block  # one row per offset within a block, every block at once


def test_rolling_sums_disjoint_context_windows_and_long_prompts_are_cut_from_the_left():
    model = make_model(vocab_size=13)
    text = [3 + i % 9 for i in range(11)]
    scorer = ContinuationScorer(model, MASK, context=4, loops=1)
    total, = scorer.rolling([text], samples=None)
    windows = [((), text[i:i + 4]) for i in range(0, 11, 4)]
    assert total.log_likelihood == pytest.approx(sum(s.log_likelihood for s in scorer.chain_rule(windows)), abs=1e-5)
    assert total.tokens == 11
    cut, = scorer.chain_rule([([9, 9, 9, 5], [7, 3])])
    assert cut.log_likelihood == pytest.approx(scorer.chain_rule([([9, 5], [7, 3])])[0].log_likelihood, abs=1e-6)
    with pytest.raises(UserError, match="exceeds the model's context"):
        scorer.chain_rule([([], [3] * 5)])


def test_block_generation_stops_rows_at_stop_strings_and_mdlm_fills_its_canvas():
    tokenizer = CharTokenizer.from_text("abcdefgh .")
    model = make_model(vocab_size=tokenizer.vocab_size, seed=3)
    spec = SamplerConfig.from_flags(sampler="topk", steps=8, temperature=0.0, loops=2)
    prompts = [tokenizer.encode("abc"), tokenizer.encode("h")]
    blocks = build_decoder(model, DiffusionConfig(block_size=2), spec, tokenizer.mask_id, context=8)
    free = generate_continuations(blocks, tokenizer, prompts, 8)
    first = tokenizer.decode(free.sequences[0][:1])
    stopped = generate_continuations(blocks, tokenizer, prompts, 8, stop=[first])
    assert stopped.sequences[0] == free.sequences[0][:2]  # stopped after the block that holds the stop string
    assert stopped.stats.row_forward_passes[0] < free.stats.row_forward_passes[0]
    assert cut_at_stop_strings(tokenizer.decode(stopped.sequences[0]), [first]) == ""
    canvas = generate_continuations(build_decoder(model, None, spec, tokenizer.mask_id, context=8), tokenizer, prompts,
                                    20)
    assert all(len(s) <= 8 - 3 for s in canvas.sequences)  # MDLM stays inside the context beside the prompt
    assert tokenizer.eos_id not in sum(canvas.sequences, [])
