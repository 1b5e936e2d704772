"""The LoopMDM recipe options (issue 9): each equals an explicitly unrolled stack with the option applied, all off
reproduce the plain model bit for bit, per-loop supervision reduces to the NELBO, truncated backprop cuts exactly the
early loops' graph, loop-count draws are fixed functions of (seed, step), and resume stays bit-exact with every
option on."""

import json
import math

import pytest
import torch

from conftest import make_model
from loopdlm.config import RunConfig
from loopdlm.diffusion.block import BlockDiffusion
from loopdlm.diffusion.loop_supervision import LoopSupervision
from loopdlm.diffusion.masked import MaskedDiffusion
from loopdlm.diffusion.schedules import LogLinear
from loopdlm.errors import UserError
from loopdlm.models import LoopedTransformer, ModelConfig
from loopdlm.sampling.engine import generate
from loopdlm.sampling.kv_cache import CachedBlockPredictor, UncachedBlockPredictor
from loopdlm.sampling.canvas import block_prompt_canvas
from loopdlm.sampling.loops import ConvergenceExit, FixedLoops
from loopdlm.sampling.selectors import FixedScheduleSelector
from loopdlm.train import loops_for_step, read_training_state, read_weights
from loopdlm.train.checkpoint_files import CONFIG_FILE, load_checkpoint_config, load_model_weights, save_checkpoint
from loopdlm.train.clipping import clip_gradients, clip_groups
from loopdlm.workflow import build_objective, build_training_objective
from test_train import MASK_ID, InterruptAfter, make_trainer, random_corpus, run_config, train_records

VOCAB = 23
#: Each option on its own, and every model option at once.
OPTIONS = {
    "add": dict(injection="add"),
    "legacy-add": dict(input_injection=True),
    "concat": dict(injection="concat"),
    "zero": dict(residual_init="zero"),
    "gated": dict(residual_init="gated"),
    "effective-depth": dict(init_depth="effective"),
    "loop-norm": dict(loop_norm=True),
    "truncated": dict(injection="add", backprop_loops=1),
    "all": dict(injection="concat", residual_init="gated", init_depth="effective", loop_norm=True,
                backprop_loops=2),
}


# ----------------------------------------------------------------------------------------- the explicit stack


def explicit_block(layer, x, positions):
    """One pre-norm block written out: x + g_a * attn(norm(x)), then x + g_m * mlp(norm(x)) (g = 1 ungated)."""
    attended, _ = layer.attn(layer.attn_norm(x), positions)
    x = x + (attended if layer.attn_gate is None else layer.attn_gate * attended)
    update = layer.mlp(layer.mlp_norm(x))
    return x + (update if layer.mlp_gate is None else layer.mlp_gate * update)


def rms_norm(x, gain, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def unrolled_logits(model, tokens, loops, detach_before=None):
    """Prelude, core repeated `loops` times with the configured injection and carry norm, coda; the carry entering
    loop `detach_before` (1-based) is cut from the graph, as truncated backprop must do."""
    cfg, d = model.config, model.config.d_model
    positions = torch.arange(tokens.shape[1])[None]
    h = model.embed(tokens)
    for index in range(cfg.core_start):
        h = explicit_block(model.layers[index], h, positions)
    e = h
    for loop in range(1, loops + 1):
        if loop == detach_before:
            h = h.detach()
        x = h
        if cfg.injection_mode == "add" and loop > 1:
            x = x + e
        elif cfg.injection_mode == "concat":
            weight = model.injection_adapter.weight  # [D, 2D] acting on [h ; e]
            x = x @ weight[:, :d].T + e @ weight[:, d:].T
        for index in range(cfg.core_start, cfg.core_end):
            x = explicit_block(model.layers[index], x, positions)
        if cfg.loop_norm:
            x = rms_norm(x, model.loop_norm.weight, model.loop_norm.eps or torch.finfo(x.dtype).eps)
        h = x
    for index in range(cfg.core_end, cfg.n_layers):
        h = explicit_block(model.layers[index], h, positions)
    return model.head(model.final_norm(h))


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_looped_forward_equals_the_unrolled_stack_with_the_option_applied(name):
    model = make_model(vocab_size=VOCAB, seed=3, **OPTIONS[name])
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    for loops in (1, 2, 4):
        torch.testing.assert_close(model(tokens, loops=loops).logits, unrolled_logits(model, tokens, loops),
                                   atol=1e-5, rtol=1e-5)


def test_options_off_reproduce_the_plain_model_bit_for_bit():
    """Every option spelled out at its off value: the defaults but for the loop-carry norm (the one option on by
    default), the same initial weights for a seed, and exactly the logits of the plain prelude / core x S / coda
    stack."""
    off = dict(injection="none", residual_init="default", init_depth="stored", loop_norm=False, backprop_loops=0)
    defaults = ModelConfig()
    assert {name: getattr(defaults, name) for name in off} == {**off, "loop_norm": True}
    torch.manual_seed(0)
    plain = LoopedTransformer(ModelConfig(vocab_size=VOCAB, n_layers=4, d_model=32, n_heads=2, core_start=1,
                                          core_end=3, max_loops=3, loop_norm=False))
    torch.manual_seed(0)
    explicit = LoopedTransformer(ModelConfig(vocab_size=VOCAB, n_layers=4, d_model=32, n_heads=2, core_start=1,
                                             core_end=3, max_loops=3, **off))
    state = plain.state_dict()
    assert list(state) == list(explicit.state_dict())
    assert all(torch.equal(state[k], v) for k, v in explicit.state_dict().items())

    model = make_model(vocab_size=VOCAB, seed=4, **off)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(9)[None]
    for loops in (1, 3):
        h = model.embed(tokens)
        for index in [0] + [1, 2] * loops + [3]:
            h, _ = model.layers[index](h, positions)
        assert torch.equal(model(tokens, loops=loops).logits, model.head(model.final_norm(h)))


def test_checkpoints_saved_before_the_loop_norm_existed_load_as_they_ran(tmp_path):
    """A saved config without model.loop_norm predates the setting, so its run had no carry norm: it loads with
    loop_norm off and its weights (no norm gain) fit the model it builds; a config written today, or by hand, gets
    the default (on)."""
    shape = {"vocab_size": VOCAB, "n_layers": 4, "d_model": 32, "n_heads": 2, "core_start": 1, "core_end": 3,
             "max_loops": 3}
    old = make_model(vocab_size=VOCAB, seed=3, loop_norm=False)
    folder = save_checkpoint(tmp_path, 1, model_state=old.state_dict(), ema_state=None, training_state={"step": 1},
                             config=RunConfig.from_dict({"model": {**shape, "loop_norm": False}}))
    saved = json.loads((folder / CONFIG_FILE).read_text())
    del saved["model"]["loop_norm"]
    (folder / CONFIG_FILE).write_text(json.dumps(saved))
    config = load_checkpoint_config(tmp_path)
    assert config.model.loop_norm is False
    model = LoopedTransformer(config.model)
    load_model_weights(tmp_path, model)
    tokens = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(model(tokens, loops=3).logits, old(tokens, loops=3).logits)
    assert RunConfig.from_dict({"model": shape}).model.loop_norm is True
    assert RunConfig.from_saved(RunConfig().to_dict()).model.loop_norm is True


def test_legacy_input_injection_is_injection_add():
    legacy = RunConfig.from_dict({"model": {"input_injection": True}}).model
    assert legacy.injection_mode == "add"
    a = make_model(vocab_size=VOCAB, seed=5, input_injection=True)
    b = make_model(vocab_size=VOCAB, seed=6, injection="add")
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(a(tokens, loops=3).logits, b(tokens, loops=3).logits)
    with pytest.raises(ValueError, match="conflicts"):
        ModelConfig(vocab_size=VOCAB, input_injection=True, injection="concat").validate()


@pytest.mark.parametrize("bad,match", [(dict(injection="mul"), "injection"), (dict(residual_init="rezero"),
                                       "residual_init"), (dict(init_depth="deep"), "init_depth"),
                                       (dict(backprop_loops=2), "needs model.injection"),
                                       (dict(backprop_loops=-1, injection="add"), "backprop_loops")])
def test_bad_option_values_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=VOCAB, core_start=1, core_end=2, **bad).validate()


@pytest.mark.parametrize("loops", [1, 3])
def test_every_parameter_gets_a_gradient_at_any_loop_count(loops):
    """Data parallelism requires it: no option may leave a parameter unused on small-S steps."""
    model = make_model(vocab_size=VOCAB, **OPTIONS["all"]).train()
    model(torch.randint(0, VOCAB, (2, 9)), loops=loops).logits.square().mean().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_loop_options_are_ignored_without_a_core():
    plain = make_model(vocab_size=VOCAB, core=(0, 0), seed=12)
    with_options = make_model(vocab_size=VOCAB, core=(0, 0), seed=13, injection="concat", loop_norm=True,
                              backprop_loops=1)
    assert list(plain.state_dict()) == list(with_options.state_dict())
    with_options.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(plain(tokens).logits, with_options(tokens).logits)


# ------------------------------------------------------------------------------------------- initialisation


def test_identity_starts_zero_and_gated_branches_begin_as_the_identity():
    tokens = torch.randint(0, VOCAB, (2, 9))
    for residual in ("zero", "gated"):
        torch.manual_seed(0)
        model = LoopedTransformer(ModelConfig(vocab_size=VOCAB, n_layers=4, d_model=32, n_heads=2, core_start=1,
                                              core_end=3, max_loops=3, residual_init=residual))
        # every block is the identity at init: what reaches the coda is the normalised embedding (loop-carry norm)
        want = model.head(model.final_norm(model.loop_norm(model.embed(tokens))))
        for loops in (1, 3):
            torch.testing.assert_close(model(tokens, loops=loops).logits, want)
    gated = model.layers[1]
    assert gated.attn.out.weight.abs().sum() > 0 and gated.attn_gate.abs().sum() == 0
    model(tokens, loops=2).logits.square().mean().backward()
    assert gated.attn_gate.grad.abs().sum() > 0  # the gates learn from the first step


def test_effective_depth_scales_residual_projections_by_the_unrolled_depth():
    stds = {}
    for depth in ("stored", "effective"):
        torch.manual_seed(0)
        model = LoopedTransformer(ModelConfig(vocab_size=VOCAB, n_layers=4, d_model=256, n_heads=2, core_start=1,
                                              core_end=3, max_loops=7, init_depth=depth))
        stds[depth] = torch.cat([layer.mlp.down.weight.flatten() for layer in model.layers]).std().item()
        assert model.layers[0].mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert stds["stored"] == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert stds["effective"] == pytest.approx(0.02 / math.sqrt(2 * (4 + 2 * 6)), rel=0.05)


def test_concat_adapter_starts_as_the_identity_on_the_carry():
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, n_layers=4, d_model=32, n_heads=2, core_start=1, core_end=3, max_loops=3)
    plain = LoopedTransformer(ModelConfig(**cfg))
    torch.manual_seed(0)
    concat = LoopedTransformer(ModelConfig(**cfg, injection="concat"))
    tokens = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(plain.layers[1].attn.qkv.weight, concat.layers[1].attn.qkv.weight)
    torch.testing.assert_close(plain(tokens, loops=3).logits, concat(tokens, loops=3).logits)


def test_flops_count_the_concat_adapter_once_per_loop_and_each_readout():
    plain, concat = make_model(), make_model(injection="concat")
    d = plain.config.d_model
    for loops in (1, 3):
        extra = concat.flops_per_token(8, loops, training=False) - plain.flops_per_token(8, loops, training=False)
        assert extra == loops * 2 * 2 * d * d
    # A readout runs the coda (layer 3 of 4) and the head once more, forward and backward.
    per_layer = 2 * (4 * d * d + 2 * d * 4 * d) + 4 * 8 * d
    head = 2 * d * plain.config.vocab_size
    assert plain.flops_per_token(8, 3, readouts=2) - plain.flops_per_token(8, 3) == 3 * 2 * (per_layer + head)


# ------------------------------------------------------------------------------------------ truncated backprop


def parameter_grads(model):
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters()}


@pytest.mark.parametrize("injection", ["add", "concat"])
def test_truncated_backprop_cuts_the_early_loops_only(injection):
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    target = torch.randn(2, 9, VOCAB, generator=torch.Generator().manual_seed(3))
    loops, keep = 4, 2
    truncated = make_model(vocab_size=VOCAB, seed=7, injection=injection, backprop_loops=keep).train()
    (truncated(tokens, loops=loops).logits * target).sum().backward()
    got = parameter_grads(truncated)

    reference = make_model(vocab_size=VOCAB, seed=8, injection=injection).train()
    reference.load_state_dict(truncated.state_dict())
    (unrolled_logits(reference, tokens, loops, detach_before=loops - keep + 1) * target).sum().backward()
    want = parameter_grads(reference)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4, msg=name)
    for name in ("layers.0.attn.qkv.weight", "layers.1.mlp.up.weight", "layers.2.attn.qkv.weight",
                 "layers.3.mlp.down.weight", "embed.weight", "head.weight"):
        assert got[name].abs().sum() > 0, name  # the prelude still learns, through the injection

    full = make_model(vocab_size=VOCAB, seed=8, injection=injection).train()
    full.load_state_dict(truncated.state_dict())
    (full(tokens, loops=loops).logits * target).sum().backward()
    assert not torch.allclose(parameter_grads(full)["layers.1.mlp.up.weight"], got["layers.1.mlp.up.weight"])
    truncated.zero_grad()
    (truncated(tokens, loops=keep).logits * target).sum().backward()  # S <= k: nothing is cut
    full.zero_grad()
    (full(tokens, loops=keep).logits * target).sum().backward()
    for name, grad in parameter_grads(full).items():
        torch.testing.assert_close(parameter_grads(truncated)[name], grad)


# -------------------------------------------------------------------------------------- per-loop supervision


def trainer_denoiser(model, loops):
    """What the trainer hands an objective: logits, or every loop's stacked readouts when asked for them."""
    def denoiser(tokens, **inputs):
        output = model(tokens, loops=loops, **inputs)
        return torch.stack(output.loop_logits) if output.loop_logits else output.logits
    return denoiser


def test_loop_logits_are_the_logits_of_shorter_unrollings():
    model = make_model(vocab_size=VOCAB, seed=9, **OPTIONS["all"])
    tokens = torch.randint(0, VOCAB, (2, 9))
    out = model(tokens, loops=3, return_loop_logits=True)
    assert len(out.loop_logits) == 3 and out.loop_logits[-1] is out.logits
    for k in (1, 2):
        torch.testing.assert_close(out.loop_logits[k - 1], model(tokens, loops=k).logits)
    plain = make_model(vocab_size=VOCAB, core=(0, 0))
    assert len(plain(tokens, return_loop_logits=True).loop_logits) == 1
    with pytest.raises(ValueError, match="cannot be combined"):
        model(tokens, loops=2, return_loop_logits=True, return_present=True)


OBJECTIVES = {"mdlm": lambda: MaskedDiffusion(VOCAB - 1, LogLinear(1e-3)),
              "block": lambda: BlockDiffusion(VOCAB - 1, 4, 12)}


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
def test_zero_weight_loop_supervision_is_the_plain_nelbo(kind):
    model = make_model(vocab_size=VOCAB, seed=10)
    x0 = torch.randint(0, VOCAB - 1, (4, 12), generator=torch.Generator().manual_seed(0))
    plain = OBJECTIVES[kind]().nelbo(trainer_denoiser(model, 3), x0, torch.Generator().manual_seed(5))
    wrapped = LoopSupervision(OBJECTIVES[kind](), 0.0).nelbo(trainer_denoiser(model, 3), x0,
                                                            torch.Generator().manual_seed(5))
    assert torch.equal(plain.nll_sum, wrapped.nll_sum) and torch.equal(plain.per_row, wrapped.per_row)
    assert torch.equal(plain.n_tokens, wrapped.n_tokens)


@pytest.mark.parametrize("kind", sorted(OBJECTIVES))
def test_loop_supervision_is_the_weighted_sum_of_per_loop_nelbos_on_the_same_noise(kind):
    model = make_model(vocab_size=VOCAB, seed=11, loop_norm=True, injection="concat")
    x0 = torch.randint(0, VOCAB - 1, (4, 12), generator=torch.Generator().manual_seed(0))
    noisable = torch.rand(4, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    objective, weight, loops = OBJECTIVES[kind](), 0.7, 3
    generator = torch.Generator().manual_seed(5)
    got = LoopSupervision(objective, weight).nelbo(trainer_denoiser(model, loops), x0, generator, noisable)

    def by_hand(k):  # the k-loop model scored on the noise the seed gives
        return objective.nelbo(lambda tokens, **inputs: model(tokens, loops=k, **inputs).logits, x0,
                               torch.Generator().manual_seed(5), noisable)

    final, earlier = by_hand(loops), [by_hand(k) for k in range(1, loops)]
    want_sum = final.nll_sum + weight * sum(t.nll_sum for t in earlier) / len(earlier)
    want_rows = final.per_row + weight * sum(t.per_row for t in earlier) / len(earlier)
    torch.testing.assert_close(got.nll_sum, want_sum)
    torch.testing.assert_close(got.per_row, want_rows)
    assert torch.equal(got.n_tokens, final.n_tokens)
    # The generator ends where the plain objective leaves it, so later draws do not depend on the weight.
    reference = torch.Generator().manual_seed(5)
    objective.nelbo(trainer_denoiser(model, loops), x0, reference, noisable)
    assert torch.equal(generator.get_state(), reference.get_state())
    assert torch.isclose(LoopSupervision(objective, weight).nelbo(trainer_denoiser(model, 1), x0,
                                                                  torch.Generator().manual_seed(5), noisable).nll_sum,
                         by_hand(1).nll_sum)  # S = 1 has no earlier loop


def test_loop_supervision_delegates_the_bound_and_is_built_for_training_only():
    config = RunConfig()
    config.diffusion.loop_supervision = 0.5
    objective = build_training_objective(config, mask_id=3)
    assert isinstance(objective, LoopSupervision) and objective.weight == 0.5 and objective.mask_id == 3
    assert isinstance(build_objective(config, mask_id=3), MaskedDiffusion)  # evaluation scores the final loop
    config.diffusion.loop_supervision = 0.0
    assert isinstance(build_training_objective(config, mask_id=3), MaskedDiffusion)
    config.diffusion.loop_supervision = -1.0
    with pytest.raises(UserError, match="loop_supervision"):
        build_training_objective(config, mask_id=3)
    model = make_model(vocab_size=VOCAB)
    x0 = torch.randint(0, VOCAB - 1, (4, 12))
    plain = MaskedDiffusion(VOCAB - 1).bound(trainer_denoiser(model, 2), x0, torch.Generator().manual_seed(0))
    wrapped = LoopSupervision(MaskedDiffusion(VOCAB - 1), 1.0).bound(trainer_denoiser(model, 2), x0,
                                                                      torch.Generator().manual_seed(0))
    assert torch.equal(plain.nll_sum, wrapped.nll_sum)


# ------------------------------------------------------------------------------------------------ loop counts


def test_uniform_draws_are_unchanged_and_every_distribution_is_a_function_of_seed_and_step():
    for step in range(1, 50):
        legacy = int(torch.randint(1, 5, (1,), generator=torch.Generator().manual_seed(7 * 1_000_003 + step)))
        assert loops_for_step(7, step, 4) == legacy
    for distribution in ("uniform", "poisson_lognormal", "curriculum"):
        draws = [loops_for_step(7, step, 8, distribution, 100) for step in range(1, 300)]
        assert draws == [loops_for_step(7, step, 8, distribution, 100) for step in range(1, 300)]
        assert draws != [loops_for_step(8, step, 8, distribution, 100) for step in range(1, 300)]
        assert min(draws) == 1 and max(draws) == 8


def test_poisson_lognormal_has_the_uniform_mean_before_the_cap():
    draws = torch.tensor([loops_for_step(1, step, 8, "poisson_lognormal") for step in range(1, 4001)]).float()
    assert draws.min() == 1 and draws.max() == 8
    # E[S] = 4.5 before capping at 8; the cap removes a little of the upper tail.
    assert 4.0 < draws.mean() < 4.5
    assert (draws == 1).float().mean() > 0.05 and (draws == 8).float().mean() > 0.02


def test_curriculum_cap_grows_linearly_to_max_loops():
    steps = 70
    for step in range(1, 200):
        cap = 1 + 7 * min(step, steps) // steps
        draws = {loops_for_step(seed, step, 8, "curriculum", steps) for seed in range(40)}
        assert max(draws) <= cap
        assert max(draws) == cap or cap > 4  # with 40 seeds the largest allowed value appears for small caps
    assert {loops_for_step(s, 5, 8, "curriculum", steps) for s in range(40)} == {1}
    assert {loops_for_step(s, 150, 8, "curriculum", steps) for s in range(200)} == set(range(1, 9))


def test_loop_distribution_settings_are_checked():
    with pytest.raises(UserError, match="unknown train.loop_distribution"):
        loops_for_step(0, 1, 4, "gaussian")
    with pytest.raises(UserError, match="loop_curriculum_steps"):
        loops_for_step(0, 1, 4, "curriculum", 0)


# --------------------------------------------------------------------------------------------------- clipping


def test_core_clipping_leaves_the_other_parameters_alone():
    model = make_model()
    params = list(model.parameters())
    groups = clip_groups(model, params, split_core=True)
    core = {id(p) for layer in model.layers[1:3] for p in layer.parameters()}
    assert {id(p) for p in groups[0]} == core and len(groups[0]) + len(groups[1]) == len(params)
    assert clip_groups(model, params, split_core=False) == [params]
    assert clip_groups(make_model(core=(0, 0)), params, split_core=True) == [params]

    def set_grads():
        for p in params:
            p.grad = torch.full_like(p, 100.0 if id(p) in core else 1e-4)

    set_grads()
    norm = clip_gradients(groups, 1.0)
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(torch.full_like(p, 100.0 if id(p) in core
                                                                                         else 1e-4))
                                                 for p in params]))
    torch.testing.assert_close(norm, want)
    assert all(torch.all(p.grad == 1e-4) for p in groups[1])  # under its threshold: untouched
    torch.testing.assert_close(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in groups[0]])),
                               torch.tensor(1.0))
    set_grads()
    clip_gradients([params], 1.0)
    assert all(torch.all(p.grad < 1e-4) for p in groups[1])  # globally the core's norm shrinks everyone


# ----------------------------------------------------------------------------------------- caching and resume


def test_cached_sampling_equals_uncached_with_every_option_on():
    model = make_model(vocab_size=VOCAB, **OPTIONS["all"])
    prompt, padding = block_prompt_canvas([[3, 4, 5, 6, 7], [8, 9]], 4, filler=1)
    canvas = torch.cat((prompt, torch.full((2, 8), 0)), dim=1)
    padding = torch.cat((padding, torch.zeros(2, 8, dtype=torch.bool)), dim=1)
    results = [generate(make(model, 0, FixedLoops(3), 4, padding=padding), canvas, FixedScheduleSelector(2), 0,
                        block_length=4, align_windows=True, generator=torch.Generator().manual_seed(0)).tokens
               for make in (CachedBlockPredictor, UncachedBlockPredictor)]
    assert (results[0] != 0).all() and torch.equal(results[0], results[1])


@pytest.mark.parametrize("per_token", [False, True])
@torch.no_grad()
def test_early_exit_works_with_every_option_on(per_token):
    model = make_model(vocab_size=VOCAB, **OPTIONS["all"])
    tokens = torch.randint(0, VOCAB, (2, 9))
    never = model(tokens, loops=4, loop_exit=ConvergenceExit(0.0, per_token))
    assert torch.equal(never.logits, model(tokens, loops=4).logits)
    at_once = model(tokens, loops=4, loop_exit=ConvergenceExit(1e9, per_token), return_hidden=True,
                    return_loop_logits=True)
    torch.testing.assert_close(at_once.logits, model(tokens, loops=1).logits)
    assert len(at_once.loop_hidden) == len(at_once.loop_logits) == 1
    assert at_once.core_applications.tolist() == [1.0, 1.0]


def everything_on(config):
    for key, value in OPTIONS["all"].items():
        setattr(config.model, key, value)
    config.train.clip_core_separately = True
    config.train.grad_clip = 0.05  # small enough that clipping acts on every step
    return config


@pytest.mark.parametrize("distribution", ["poisson_lognormal", "curriculum"])
def test_resume_is_bit_exact_with_every_option_on(tmp_path, distribution):
    tokens = random_corpus()
    config = everything_on(run_config(core=(0, 1), grad_accum=2, ckpt_every=3, eval_every=2))
    config.train.loop_distribution, config.train.loop_curriculum_steps = distribution, 4
    config.diffusion.loop_supervision = 0.5
    objective = LoopSupervision(MaskedDiffusion(MASK_ID), 0.5)
    straight = make_trainer(config, tmp_path / "a", tokens, objective=objective).fit()
    assert {s for _, _, s in straight.history} != {1}

    source = InterruptAfter(tokens, batch_size=4, seed=1, fail_at=9)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(config, tmp_path / "b", tokens, train_source=source, objective=objective).fit()
    assert read_training_state(tmp_path / "b")["step"] == 3
    resumed = make_trainer(config, tmp_path / "b", tokens, init_seed=123, objective=objective).fit()

    assert straight.history[3:] == resumed.history
    assert [(r["step"], r["loss"], r["loops"], r["grad_norm"]) for r in train_records(tmp_path / "a")] == \
        [(r["step"], r["loss"], r["loops"], r["grad_norm"]) for r in train_records(tmp_path / "b")]
    assert straight.eval_metrics == resumed.eval_metrics
    for use_ema in (False, True):
        a, b = read_weights(tmp_path / "a", use_ema), read_weights(tmp_path / "b", use_ema)
        assert all(torch.equal(a[name], b[name]) for name in a)
    assert "injection_adapter.weight" in a and "layers.0.attn_gate" in a and "loop_norm.weight" in a


def test_loop_supervision_adds_the_earlier_loops_to_the_training_loss(tmp_path):
    tokens = random_corpus()
    config = run_config(core=(0, 1), steps=1, eval_every=1)
    plain = make_trainer(config, tmp_path / "plain", tokens).fit()
    supervised = make_trainer(config, tmp_path / "deep", tokens,
                              objective=LoopSupervision(MaskedDiffusion(MASK_ID), 1.0)).fit()
    (_, loss_plain, loops), (_, loss_deep, _) = plain.history[0], supervised.history[0]
    assert loops > 1 and loss_deep > loss_plain  # same weights and noise, plus the earlier loops' NELBO
