"""Loop-count policies at sampling time: adaptive exit, per-token freezing, scheduled depth, and their accounting."""

import pytest
import torch

from loopdlm.models.transformer import LoopedTransformer, ModelConfig
from loopdlm.sampling import SamplerConfig, build_decoder
from loopdlm.sampling.loops import AdaptiveLoops, ConvergenceExit, FixedLoops, ScheduledLoops

MASK = 0
S_MAX = 4


@pytest.fixture(scope="module")
def model() -> LoopedTransformer:
    """prelude = layer 0, core = layer 1, coda = layer 2 (the paper stack: the replays below do not apply the
    loop-carry norm); weights perturbed so outputs depend on the input."""
    torch.manual_seed(0)
    net = LoopedTransformer(ModelConfig(vocab_size=11, n_layers=3, d_model=32, n_heads=2, core_start=1,
                                        core_end=2, max_loops=S_MAX, loop_norm=False))
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.15)
    return net.eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(1, 11, (3, 16), generator=generator)
    x[:, 6:] = MASK
    return x


def prelude_output(model: LoopedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The hidden state entering the core (what loop 1 is compared against)."""
    h, _ = model.layers[0](model.embed(tokens), torch.arange(tokens.shape[1])[None])
    return h


@pytest.mark.parametrize("per_token", [False, True])
@torch.no_grad()
def test_adaptive_with_zero_epsilon_equals_fixed_s_max_exactly(model, tokens, per_token):
    fixed = model(tokens, loops=S_MAX)
    adaptive = model(tokens, loops=S_MAX, loop_exit=ConvergenceExit(0.0, per_token))
    assert torch.equal(adaptive.logits, fixed.logits)
    assert adaptive.core_applications.tolist() == [float(S_MAX)] * tokens.shape[0]


@pytest.mark.parametrize("per_token", [False, True])
def test_adaptive_zero_epsilon_sampling_matches_fixed_tokens_and_accounting(model, tokens, per_token):
    def run(policy: str):
        spec = SamplerConfig.from_flags(sampler="threshold", threshold=0.5, temperature=1.0, loops=S_MAX,
                                        loop_policy=policy, loop_eps=0.0, per_token_exit=per_token, block_length=5)
        return build_decoder(model, None, spec, MASK).fill(tokens, generator=torch.Generator().manual_seed(3))

    fixed, adaptive = run("fixed"), run("adaptive")
    assert torch.equal(adaptive.tokens, fixed.tokens)
    assert adaptive.stats.forward_passes == fixed.stats.forward_passes
    assert torch.equal(adaptive.stats.core_applications, fixed.stats.core_applications)
    assert torch.equal(fixed.stats.core_applications, S_MAX * fixed.stats.row_forward_passes.float())


@torch.no_grad()
def test_per_token_exit_freezes_converged_tokens_and_counts_mean_loops(model, tokens):
    first = model(tokens, loops=1, return_hidden=True).loop_hidden[0]
    start = prelude_output(model, tokens)
    change = (first - start).norm(dim=-1) / first.norm(dim=-1)
    eps = float(change.median())  # about half the tokens converge after loop 1
    rule = ConvergenceExit(eps, per_token=True)
    out = model(tokens, loops=S_MAX, loop_exit=rule, return_hidden=True)

    frozen_after_first = change < eps
    assert 0 < int(frozen_after_first.sum()) < frozen_after_first.numel()
    for later in out.loop_hidden[1:]:
        assert torch.equal(later[frozen_after_first], out.loop_hidden[0][frozen_after_first])
    moved = (out.loop_hidden[1] != out.loop_hidden[0]).any(dim=-1)
    assert torch.equal(moved, ~frozen_after_first)

    # Replay the rule on the recorded states: loops applied per token, averaged per row.
    states = [start, *out.loop_hidden]
    active = torch.ones_like(frozen_after_first)
    applied = torch.ones(tokens.shape, dtype=torch.float32)
    for loop in range(1, S_MAX):
        active = active & rule.keep_going(loop, states[loop - 1], states[loop])
        applied += active.float()
    assert torch.allclose(out.core_applications, applied.mean(dim=1))
    assert float(out.core_applications.mean()) < S_MAX


@torch.no_grad()
def test_per_sequence_exit_stops_whole_rows(model, tokens):
    rule = ConvergenceExit(1e9)  # every row has converged after the first loop
    out = model(tokens, loops=S_MAX, loop_exit=rule)
    assert out.core_applications.tolist() == [1.0] * tokens.shape[0]
    assert torch.equal(out.logits, model(tokens, loops=1).logits)


def test_scheduled_loops_peak_at_half_masked():
    policy = ScheduledLoops(2, 10)
    # S = round(2 + 8 * 4 r (1 - r)), r = 1 - progress.
    assert [policy.loops_for(p) for p in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)] == [2, 8, 10, 8, 5, 2]


def test_scheduled_policy_drives_per_step_core_applications(model):
    # 8 masked slots, 4 fixed-schedule steps of 2 commits: progress 0, 1/4, 1/2, 3/4 -> S = 2, 8, 10, 8.
    canvas = torch.randint(1, 11, (2, 12))
    canvas[:, 4:] = MASK
    spec = SamplerConfig.from_flags(sampler="topk", steps=4, temperature=0.0, loops=10, loop_policy="scheduled",
                                    min_loops=2)
    result = build_decoder(model, None, spec, MASK).fill(canvas)
    assert result.stats.forward_passes == 4
    assert result.stats.core_applications.tolist() == [28.0, 28.0]


def test_build_loop_policy_defaults_to_training_s_max_and_validates(model):
    assert build_decoder(model, None, SamplerConfig(), MASK).loop_policy().loops_for(0.3) == S_MAX
    adaptive = build_decoder(model, None, SamplerConfig.from_flags(loop_policy="adaptive", loops=7, loop_eps=0.05,
                                                                   per_token_exit=True), MASK).loop_policy()
    assert isinstance(adaptive, AdaptiveLoops) and adaptive.loops_for(0.0) == 7
    assert adaptive.exit_rule.eps == 0.05 and adaptive.exit_rule.per_token
    for bad in (lambda: FixedLoops(0), lambda: ScheduledLoops(3, 2), lambda: AdaptiveLoops(0, 0.1)):
        with pytest.raises(ValueError):
            bad()
