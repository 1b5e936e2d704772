import torch

from conftest import make_model
from loopdlm.models import LoopedTransformer, ModelConfig


def unrolled_forward(model: LoopedTransformer, tokens: torch.Tensor, loops: int) -> torch.Tensor:
    """The same computation written as an explicit stack: prelude, core repeated (its output RMS-normalised after
    every loop when the model has the loop-carry norm), coda."""
    cfg = model.config
    h = model.embed(tokens)
    positions = torch.arange(tokens.shape[1])[None]
    for index in range(cfg.core_start):
        h, _ = model.layers[index](h, positions)
    for _ in range(loops):
        for index in range(cfg.core_start, cfg.core_end):
            h, _ = model.layers[index](h, positions)
        if model.loop_norm is not None:
            h = model.loop_norm(h)
    for index in range(cfg.core_end, cfg.n_layers):
        h, _ = model.layers[index](h, positions)
    return model.head(model.final_norm(h))


def test_looped_forward_equals_explicitly_unrolled_stack(tiny_model):
    tokens = torch.randint(0, 23, (2, 10))
    paper = make_model(loop_norm=False)
    assert tiny_model.loop_norm is not None and paper.loop_norm is None  # the default recipe has the carry norm
    for model in (tiny_model, paper):
        for loops in (1, 2, 5):
            torch.testing.assert_close(model(tokens, loops=loops).logits, unrolled_forward(model, tokens, loops))


def test_logits_depend_on_input_and_loop_count(tiny_model):
    tokens = torch.randint(0, 23, (1, 10))
    other = tokens.clone()
    other[0, 3] = (other[0, 3] + 1) % 23
    assert not torch.allclose(tiny_model(tokens).logits, tiny_model(other).logits)
    assert not torch.allclose(tiny_model(tokens, loops=1).logits, tiny_model(tokens, loops=2).logits)


def test_loops_beyond_training_maximum_run(tiny_model):
    out = tiny_model(torch.randint(0, 23, (2, 8)), loops=3 * tiny_model.config.max_loops, return_hidden=True)
    assert torch.isfinite(out.logits).all()
    assert len(out.loop_hidden) == 9 and out.core_applications.tolist() == [9.0, 9.0]


def test_parameter_count_independent_of_loops():
    base = dict(vocab_size=17, n_layers=4, d_model=32, n_heads=2, core_start=1, core_end=3)
    counts = {LoopedTransformer(ModelConfig(max_loops=s, **base)).num_parameters() for s in (1, 4, 12)}
    plain = LoopedTransformer(ModelConfig(vocab_size=17, n_layers=4, d_model=32, n_heads=2)).num_parameters()
    assert counts == {plain + 32}  # the loop-carry norm's gain is the only extra parameter of a looped model
    paper = {LoopedTransformer(ModelConfig(max_loops=s, loop_norm=False, **base)).num_parameters() for s in (1, 4)}
    assert paper == {plain}


def test_looped_weights_receive_gradient_from_every_loop(tiny_model):
    """Each loop contributes: the core gradient with S loops equals the sum of per-loop contributions, so it must
    differ from the S=1 gradient and grow with unrolled depth; checked by hooking the core's input at each loop."""
    model = make_model()
    model.train()
    tokens = torch.randint(0, 23, (2, 8))
    seen_loops = []
    core_layer = model.layers[model.config.core_start]
    handle = core_layer.register_full_backward_hook(lambda mod, gin, gout: seen_loops.append(gout[0].abs().sum()))
    model(tokens, loops=4).logits.square().mean().backward()
    handle.remove()
    assert len(seen_loops) == 4 and all(g > 0 for g in seen_loops)
    assert core_layer.attn.qkv.weight.grad.abs().sum() > 0


def test_input_injection_changes_output_only_after_first_loop():
    plain = make_model(seed=1)
    injected = make_model(seed=1, input_injection=True)
    tokens = torch.randint(0, 23, (1, 6))
    torch.testing.assert_close(plain(tokens, loops=1).logits, injected(tokens, loops=1).logits)
    assert not torch.allclose(plain(tokens, loops=2).logits, injected(tokens, loops=2).logits)


def test_activation_checkpointing_gives_same_loss_and_gradients():
    tokens = torch.randint(0, 23, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = make_model(seed=2).train()
        model.checkpoint_loops = checkpointing
        model(tokens, loops=3).logits.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_convergence_exit_with_zero_threshold_runs_every_loop(tiny_model):
    from loopdlm.sampling.loops import ConvergenceExit

    tokens = torch.randint(0, 23, (2, 8))
    full = tiny_model(tokens, loops=5)
    gated = tiny_model(tokens, loops=5, loop_exit=ConvergenceExit(0.0))
    torch.testing.assert_close(full.logits, gated.logits)
    assert gated.core_applications.tolist() == [5.0, 5.0]
    early = tiny_model(tokens, loops=5, loop_exit=ConvergenceExit(10.0))
    assert early.core_applications.tolist() == [1.0, 1.0]


def test_cached_prefix_attention_matches_full_sequence(tiny_model):
    """Attending to cached (pre-RoPE) keys of a prefix equals running prefix and suffix together."""
    tokens = torch.randint(0, 23, (2, 10))
    full = tiny_model(tokens, loops=2).logits
    prefix = tiny_model(tokens[:, :6], loops=2, return_present=True)
    positions = torch.arange(10)[None]
    past = {slot: (k, v, positions[:, :6]) for slot, (k, v) in prefix.present.items()}
    # the prefix itself would see the suffix in the full bidirectional run, so compare the suffix rows only
    # against a run where the prefix cannot see the suffix
    causal_blocks = torch.ones(10, 10, dtype=torch.bool)
    causal_blocks[:6, 6:] = False
    reference = tiny_model(tokens, loops=2, attn_mask=causal_blocks[None, None]).logits
    suffix = tiny_model(tokens[:, 6:], loops=2, position_ids=positions[:, 6:], past=past).logits
    torch.testing.assert_close(suffix, reference[:, 6:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reference[:, 6:], full[:, 6:])


def test_flops_count_the_core_once_per_loop():
    model = make_model()
    cfg = model.config
    d, hidden = cfg.d_model, int(cfg.mlp_ratio * cfg.d_model)
    per_layer = 2 * (4 * d * d + 2 * d * hidden) + 4 * 16 * d
    diff = model.flops_per_token(16, loops=4) - model.flops_per_token(16, loops=1)
    assert diff == 3 * 3 * cfg.core_layers * per_layer
