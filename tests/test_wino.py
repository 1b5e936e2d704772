"""WINO (shadow-block draft-and-verify decoding) and WINO+ (trajectory distillation)."""

import itertools
import math

import pytest
import torch

from loopdlm.data.task_source import answer_canvas, encode_task, task_tokenizer
from loopdlm.data.tasks import SudokuTask
from loopdlm.diffusion.block import block_causal_mask
from loopdlm.diffusion.masked import subs_log_probs
from loopdlm.eval.tasks import task_accuracy
from loopdlm.models.transformer import LoopedTransformer, ModelConfig
from loopdlm.sampling import SELECTORS, SamplerConfig, build_decoder
from loopdlm.sampling.sampler_config import build_selector
from loopdlm.sampling.predictors import FullSequencePredictor
from loopdlm.sampling.engine import Decision, StepContext, generate
from loopdlm.sampling.kv_cache import CachedBlockPredictor
from loopdlm.sampling.loops import FixedLoops, ScheduledLoops
from loopdlm.sampling.wino import (
    ShadowBlock,
    WinoSelector,
    accept_cap,
    shadow_block_mask,
    shadow_position_ids,
)
from loopdlm.train.wino_plus import (
    RECORDING_SPEC,
    Trajectory,
    WinoPlusLossWeights,
    WinoPlusRows,
    build_rows,
    decode_recorded,
    finetune_wino_plus,
    last_acceptance_steps,
    record_trajectories,
    wino_plus_loss,
)

MASK = 0


def perturbed_model(n_layers=2, vocab=10, std=0.8, core=(0, 0), max_loops=1, seed=0) -> LoopedTransformer:
    """A float64 model whose outputs depend strongly on the input (random weights, no zero-initialised layer; the
    paper stack without the loop-carry norm, on which these tests' expectations were written)."""
    torch.manual_seed(seed)
    net = LoopedTransformer(ModelConfig(vocab_size=vocab, n_layers=n_layers, d_model=32, n_heads=2,
                                        core_start=core[0], core_end=core[1], max_loops=max_loops,
                                        loop_norm=False)).double()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, std)
    return net.eval()


@pytest.fixture(scope="module")
def model() -> LoopedTransformer:
    return perturbed_model()


def canvas(rows=4, length=24, prompt=6, seed=1) -> torch.Tensor:
    x = torch.randint(1, 10, (rows, length), generator=torch.Generator().manual_seed(seed))
    x[:, prompt:] = MASK
    return x


# ------------------------------------------------------------------------------------------ attention layout


def brute_force_mask(length: int, window: slice, base=None) -> torch.Tensor:
    width = window.stop - window.start
    allowed = torch.zeros(length + width, length + width, dtype=torch.bool)
    for q, k in itertools.product(range(length + width), repeat=2):
        if q < length:  # sequence row
            allowed[q, k] = k < length and (base is None or bool(base[q, k]))
        elif k >= length:  # shadow row, shadow column
            allowed[q, k] = True
        else:  # shadow row i, sequence column: what window row i sees, minus column i itself
            twin = window.start + q - length
            allowed[q, k] = k != twin and (base is None or bool(base[twin, k]))
    return allowed


@pytest.mark.parametrize("length,window", [(7, slice(2, 5)), (9, slice(0, 9)), (10, slice(6, 10))])
def test_shadow_mask_matches_brute_force_rule(length, window):
    assert torch.equal(shadow_block_mask(None, window, length), brute_force_mask(length, window))


def test_shadow_mask_follows_a_block_causal_base_mask():
    length, window = 8, slice(4, 6)
    block = torch.arange(length) // 2
    base = block[:, None] >= block[None, :]  # block-causal attention between sequence positions
    assert torch.equal(shadow_block_mask(base, window, length), brute_force_mask(length, window, base))


def test_shadow_positions_repeat_the_window_positions():
    assert shadow_position_ids(torch.arange(5)[None], slice(2, 4)).tolist() == [[0, 1, 2, 3, 4, 2, 3]]


# -------------------------------------------------------------------------------------------------- denoiser


def test_shadow_slot_ignores_its_own_token_but_not_the_others():
    net = perturbed_model(n_layers=1)  # one layer: no second-hop path from token i into shadow row i
    denoiser = ShadowBlock(FullSequencePredictor(net, MASK))
    tokens = torch.randint(1, 10, (2, 12), generator=torch.Generator().manual_seed(4))
    window, slot = slice(5, 10), 2
    changed = tokens.clone()
    changed[:, window.start + slot] = torch.where(tokens[:, window.start + slot] == 3, 4, 3)
    before = denoiser(tokens, window, 0.0).shadow_log_probs
    after = denoiser(changed, window, 0.0).shadow_log_probs
    assert torch.equal(after[:, slot], before[:, slot])
    others = [i for i in range(window.stop - window.start) if i != slot]
    assert not torch.allclose(after[:, others], before[:, others])


def test_sequence_log_probs_are_those_of_the_plain_denoiser(model):
    tokens, window = canvas(), slice(6, 15)
    tokens[:, 8] = 5
    wino = ShadowBlock(FullSequencePredictor(model, MASK))(tokens, window, 0.0)
    plain = FullSequencePredictor(model, MASK)(tokens, window, 0.0)
    finite = plain.log_probs.isfinite()
    assert torch.equal(wino.log_probs.isfinite(), finite)
    assert torch.allclose(wino.log_probs[finite], plain.log_probs[finite], atol=1e-6)
    assert wino.shadow_log_probs.shape == (4, 9, 10)


# -------------------------------------------------------------------------------------------------- selector


def step_context(confidence, selectable, tokens, shadow_probs, editable=None) -> StepContext:
    """A one-row StepContext whose shadow block gives probability shadow_probs[i] to the token at slot i."""
    width = len(confidence)
    tokens = torch.tensor([tokens])
    shadow = torch.full((1, width, 10), 1e-9, dtype=torch.float64)
    shadow.scatter_(-1, tokens[..., None], torch.tensor(shadow_probs, dtype=torch.float64)[None, :, None])
    selectable = torch.tensor([selectable])
    return StepContext(tokens=tokens, log_probs=torch.zeros(1, width, 10), candidates=torch.ones_like(tokens),
                       confidence=torch.tensor([confidence]), selectable=selectable,
                       editable=torch.ones_like(selectable) if editable is None else torch.tensor([editable]),
                       step=0, window_masked_at_start=torch.tensor([width]), generator=None,
                       shadow_log_probs=shadow.log())


def test_accept_cap_is_seventy_percent_clamped_to_five_and_twenty():
    assert accept_cap(torch.tensor([0, 7, 8, 10, 20, 28, 29, 100])).tolist() == [5, 5, 5, 7, 14, 19, 20, 20]


def test_draft_takes_above_tau1_up_to_the_cap_or_the_single_best():
    selector = WinoSelector(tau1=0.5, tau2=0.0, min_accept=2, max_accept=2)
    selector.start_window(torch.tensor([4]))
    ctx = step_context([0.9, 0.6, 0.8, 0.55], [True] * 4, [MASK] * 4, [0.5] * 4)
    assert selector.select(ctx).commit.tolist() == [[True, False, True, False]]  # 3 pass, cap 2
    ctx = step_context([0.1, 0.3, 0.2, 0.5], [True] * 4, [MASK] * 4, [0.5] * 4)
    assert selector.select(ctx).commit.tolist() == [[False, False, False, True]]  # none passes (> is strict)


def test_verify_remasks_weak_earlier_tokens_at_most_last_accept_minus_one():
    selector = WinoSelector(tau1=0.5, tau2=0.7)
    selector.start_window(torch.tensor([6]))
    # step 1: three drafted, nothing decoded yet so nothing to verify.
    first = selector.select(step_context([0.9, 0.9, 0.9, 0.1, 0.1, 0.1], [True] * 6, [MASK] * 6, [0.0] * 6))
    assert first.commit.sum() == 3 and not first.remask.any()
    # step 2: slots 0-2 decoded with shadow support 0.1, 0.65, 0.3 (all < 0.7); two drafted -> re-mask at most
    # 3 - 1 = 2, the least supported first: slots 0 and 2.
    ctx = step_context([0, 0, 0, 0.8, 0.9, 0.2], [False, False, False, True, True, True], [4, 5, 6, MASK, MASK, MASK],
                       [0.1, 0.65, 0.3, 0, 0, 0])
    second = selector.select(ctx)
    assert second.commit.tolist() == [[False, False, False, True, True, False]]
    assert second.remask.tolist() == [[True, False, True, False, False, False]]
    # step 3: previous step accepted 2 -> at most 1 re-mask.
    ctx = step_context([0, 0, 0, 0, 0, 0.99], [False] * 5 + [True], [4, 5, 6, 7, 8, MASK], [0.1, 0.2, 0.3, 0.4, 0.5, 0])
    third = selector.select(ctx)
    assert third.commit.sum() == 1 and not third.remask.any()  # one drafted: no verification at all


def test_verify_never_touches_fixed_context_tokens():
    selector = WinoSelector(tau1=0.5, tau2=0.9)
    selector.start_window(torch.tensor([10]))
    ctx = step_context([0, 0.9, 0.9], [False, True, True], [4, MASK, MASK], [0.0, 0, 0], editable=[False, True, True])
    assert not selector.select(ctx).remask.any()


def test_selector_without_shadow_block_raises(model):
    with pytest.raises(ValueError, match="shadow"):
        generate(FullSequencePredictor(model, MASK), canvas(), WinoSelector(), MASK, temperature=0.0)


# -------------------------------------------------------------------------------------------- full decoding


class CappedThreshold:
    """Hand-written baseline: commit masked slots with confidence > tau1, at most the WINO cap, else the best."""

    def __init__(self, tau1):
        self.tau1 = tau1

    def start_window(self, masked_counts):
        pass

    def select(self, ctx):
        commit = torch.zeros_like(ctx.selectable)
        for row in range(ctx.selectable.shape[0]):
            masked = ctx.selectable[row].nonzero().flatten().tolist()
            if not masked:
                continue
            order = sorted(masked, key=lambda j: -float(ctx.confidence[row, j]))
            cap = min(max(int(len(masked) * 0.7), 5), 20)
            passing = [j for j in order if float(ctx.confidence[row, j]) > self.tau1][:cap]
            for j in passing or order[:1]:
                commit[row, j] = True
        return Decision(commit=commit)


@pytest.mark.parametrize("tau1,block,loops", [(0.5, 9, None), (0.3, 0, None), (0.4, 7, ScheduledLoops(1, 3))])
def test_wino_without_verification_equals_capped_threshold_decoding(tau1, block, loops):
    net = perturbed_model(n_layers=3, core=(1, 2), max_loops=3) if loops else perturbed_model()
    x = canvas(length=40)
    wino = generate(ShadowBlock(FullSequencePredictor(net, MASK, loops)), x, WinoSelector(tau1, tau2=0.0), MASK,
                    block_length=block, temperature=0.0)
    plain = generate(FullSequencePredictor(net, MASK, loops), x, CappedThreshold(tau1), MASK, block_length=block,
                     temperature=0.0)
    assert torch.equal(wino.tokens, plain.tokens)
    assert wino.stats.committed_per_step == plain.stats.committed_per_step
    assert wino.stats.remasked == 0


@torch.no_grad()
def reference_wino_row(net, row: torch.Tensor, block: int, tau1: float, tau2: float) -> tuple[torch.Tensor, int]:
    """WINO for one sequence written out slot by slot, after the reference decoding_wino (greedy)."""
    x = row.clone()
    length = len(x)
    start = int((x == MASK).nonzero()[0])
    steps = 0
    for lo in range(start, length, block):
        window = list(range(lo, min(lo + block, length)))
        width = len(window)
        attn = brute_force_mask(length, slice(lo, lo + width))[None, None]
        positions = torch.tensor([list(range(length)) + window])
        decoded, last_accept = [], 30
        while any(x[j] == MASK for j in window):
            extended = torch.cat((x, torch.full((width,), MASK)))[None]
            probs = subs_log_probs(net(extended, position_ids=positions, attn_mask=attn).logits, MASK)[0].exp()
            masked = [j for j in window if x[j] == MASK]
            cap = min(max(int(len(masked) * 0.7), 5), 20)
            best = {j: int(probs[j].argmax()) for j in masked}
            conf = {j: float(probs[j, best[j]]) for j in masked}
            ranked = sorted(masked, key=lambda j: -conf[j])
            drafted = [j for j in ranked if conf[j] > tau1][:cap] or ranked[:1]
            remasked = []
            if len(drafted) > 1:
                support = {j: float(probs[length + window.index(j), x[j]]) for j in decoded}
                weak = sorted((j for j in decoded if support[j] < tau2), key=lambda j: support[j])
                remasked = weak[:max(last_accept - 1, 0)]
            for j in drafted:
                x[j] = best[j]
                decoded.append(j)
            for j in remasked:
                x[j] = MASK
                decoded.remove(j)
            last_accept = len(drafted)
            steps += 1
    return x, steps


@pytest.mark.parametrize("tau1,tau2,block", [(0.5, 0.9, 9), (0.3, 0.9, 0), (0.2, 0.6, 7)])
def test_wino_matches_slot_by_slot_reference_and_batched_equals_row_by_row(model, tau1, tau2, block):
    x = canvas()
    batched = generate(ShadowBlock(FullSequencePredictor(model, MASK)), x, WinoSelector(tau1, tau2), MASK,
                       block_length=block, temperature=0.0)
    assert batched.stats.remasked > 0  # verification is exercised
    for row in range(x.shape[0]):
        alone = generate(ShadowBlock(FullSequencePredictor(model, MASK)), x[row:row + 1], WinoSelector(tau1, tau2),
                         MASK, block_length=block, temperature=0.0)
        assert torch.equal(alone.tokens[0], batched.tokens[row])
        assert alone.stats.forward_passes == int(batched.stats.row_forward_passes[row])
        reference_tokens, reference_steps = reference_wino_row(model, x[row], block or x.shape[1], tau1, tau2)
        assert torch.equal(reference_tokens, batched.tokens[row])
        assert reference_steps == alone.stats.forward_passes


@pytest.mark.parametrize("tau1,tau2,block,temperature", [(0.9, 1.0, 5, 0.0), (0.1, 1.0, 0, 1.0), (0.5, 0.99, 8, 0.5),
                                                         (0.0, 1.0, 3, 1.0)])
def test_every_wino_decode_fills_every_slot_within_one_step_per_slot(model, tau1, tau2, block, temperature):
    x = canvas(rows=3, length=30)
    x[2, 12] = 7  # fixed context inside the region is never re-masked
    result = generate(ShadowBlock(FullSequencePredictor(model, MASK)), x, WinoSelector(tau1, tau2), MASK,
                      block_length=block, temperature=temperature, generator=torch.Generator().manual_seed(5))
    assert not (result.tokens == MASK).any()
    assert result.tokens[2, 12] == 7 and torch.equal(result.tokens[:, :6], x[:, :6])
    windows = -(-24 // block) if block else 1
    assert len(result.stats.committed_per_step) <= 24 + windows  # decoded count grows by >= 1 per step


def test_wino_accounting_counts_one_forward_per_step_including_the_shadow():
    net = perturbed_model(n_layers=3, core=(1, 2), max_loops=3)
    x = canvas(rows=2)
    x[1, 6:10] = 3  # row 1 has fewer masks, so it idles at the end of the first window
    result = generate(ShadowBlock(FullSequencePredictor(net, MASK, FixedLoops(3))), x, WinoSelector(0.5, 0.9), MASK,
                      block_length=9, temperature=0.0)
    stats = result.stats
    assert stats.forward_passes == len(stats.committed_per_step)
    assert int(stats.row_forward_passes.max()) == stats.forward_passes
    assert torch.equal(stats.core_applications, 3.0 * stats.row_forward_passes)
    assert stats.generated_tokens == int((x == MASK).sum())


def test_sample_with_wino_spec_uses_the_shadow_denoiser(model):
    spec = SamplerConfig.from_flags(sampler="wino", tau1=0.2, tau2=0.6, temperature=0.0, block_length=7, loops=1)
    via_spec = build_decoder(model, None, spec, MASK).fill(canvas())
    direct = generate(ShadowBlock(FullSequencePredictor(model, MASK)), canvas(), WinoSelector(0.2, 0.6), MASK,
                      block_length=7, temperature=0.0)
    assert torch.equal(via_spec.tokens, direct.tokens) and via_spec.stats.remasked == direct.stats.remasked > 0
    assert "wino" in SELECTORS
    selector = build_selector(SamplerConfig.from_flags(sampler="wino", wino_min_accept=2, wino_max_accept=4), 10)
    assert (selector.min_accept, selector.max_accept, selector.accept_fraction) == (2, 4, 0.7)


# ------------------------------------------------------------------------------------------------------ WINO+


def test_last_acceptance_steps_count_each_rows_own_steps():
    m = MASK
    states = [torch.tensor([[9, m, m, m], [9, m, m, m]]),
             torch.tensor([[9, 4, 5, m], [9, m, m, m]]),  # step 0: row 1 idle
             torch.tensor([[9, 4, m, 6], [9, 4, m, m]]),  # row 0 revokes column 2
             torch.tensor([[9, 4, 7, 6], [9, 4, 5, 6]])]
    assert last_acceptance_steps(states, MASK).tolist() == [[-1, 0, 2, 1], [-1, 0, 1, 1]]
    assert last_acceptance_steps(states[:2] + states[1:], MASK).tolist() == [[-1, 0, 2, 1], [-1, 0, 1, 1]]


@pytest.fixture(scope="module")
def sudoku():
    """4x4 sudoku: 16-cell answers, long enough for WINO to draft several cells and revoke some."""
    task = SudokuTask(4, givens=6)
    tokenizer = task_tokenizer(task)
    examples = task.generate(6, seed=0)
    return task, tokenizer, examples, answer_canvas(encode_task(task, examples, tokenizer), tokenizer.mask_id)


def wino_plus_model(tokenizer) -> LoopedTransformer:
    return perturbed_model(n_layers=3, vocab=tokenizer.vocab_size, core=(1, 2), max_loops=3, seed=1)


def test_rows_rebuild_the_recorded_trajectory(sudoku):
    task, tokenizer, examples, x = sudoku
    net = wino_plus_model(tokenizer)
    spec = SamplerConfig.from_flags(sampler="wino", tau1=0.5, tau2=0.8, temperature=0.0, block_length=8, loops=2)
    recorded = decode_recorded(net, x, tokenizer.mask_id, spec)
    result, states = recorded.result, recorded.states
    assert result.stats.remasked > 0 and len(states) == result.stats.forward_passes + 1
    assert torch.equal(result.tokens, build_decoder(net, None, spec, tokenizer.mask_id).fill(x).tokens)
    accept, windows = recorded.accept_steps(tokenizer.mask_id), recorded.window_index(tokenizer.mask_id)
    assert windows[0].tolist() == [-1] * task.prompt_length + [0] * 8 + [1] * 8
    for row in range(x.shape[0]):
        trajectory = Trajectory(result.tokens[row], accept[row], windows[row], row, 0.0)
        rows = build_rows([trajectory], tokenizer.mask_id)
        assert len(rows) == len(accept[row][accept[row] >= 0].unique())
        row_states = [states[0][row]] + [b[row] for a, b in zip(states, states[1:]) if not torch.equal(a[row], b[row])]
        state = x[row].clone()
        for k in range(len(rows)):
            # Each row's input is the previous row's input with the previous targets filled in.
            assert torch.equal(rows.inputs[k], state)
            assert torch.equal(rows.block[k], windows[row] == windows[row][rows.targets[k]][0])
            state = torch.where(rows.targets[k], rows.clean[k], state)
            # Tokens finalised so far are on the canvas right after their step, with the same values.
            step = int(accept[row][rows.targets[k]][0])
            visible = state != tokenizer.mask_id
            assert torch.equal(row_states[step + 1][visible], state[visible])
        assert torch.equal(state, result.tokens[row])


class ScriptedSudoku(SudokuTask):
    """Accepts prompt i on its (passes_on[i])-th verification (0 = never), to exercise the retry ladder."""

    def __init__(self, prompts, passes_on):
        super().__init__(4, givens=6)
        self.passes_on = dict(zip(prompts, passes_on))
        self.calls = {p: 0 for p in prompts}

    def verify(self, example_prompt, predicted_answer):
        self.calls[example_prompt] += 1
        return self.calls[example_prompt] == self.passes_on[example_prompt]


def test_record_retries_rejected_prompts_at_rising_temperature(sudoku):
    _, tokenizer, examples, x = sudoku
    examples, x = examples[:3], x[:3]
    task = ScriptedSudoku([e.prompt for e in examples], passes_on=[1, 3, 0])
    net = wino_plus_model(tokenizer)
    trajectories = record_trajectories(net, task, tokenizer, examples, seed=11)
    assert [(t.example_index, t.temperature) for t in trajectories] == [(0, 0.0), (1, 0.2)]
    assert list(task.calls.values()) == [1, 3, 6]
    # The kept decode is exactly WINO's decode of that prompt at that temperature (rows decode independently).
    spec = SamplerConfig.from_flags(sampler="wino", tau1=0.5, tau2=0.8, temperature=0.2)
    again = decode_recorded(net, x[[1, 2]], tokenizer.mask_id, spec, torch.Generator().manual_seed(11 + 2))
    assert torch.equal(trajectories[1].tokens, again.result.tokens[0])
    assert torch.equal(trajectories[1].accept_step, again.accept_steps(tokenizer.mask_id)[0])
    assert trajectories[1].steps == int(again.result.stats.row_forward_passes[0])


def test_loss_terms_on_hand_made_distributions():
    m = MASK
    # One row, 4 columns, vocab 4 (id 0 = mask): column 0 prompt, 1 target, 2-3 masked non-targets in the block.
    rows = WinoPlusRows(inputs=torch.tensor([[3, m, m, m]]), clean=torch.tensor([[3, 1, 2, 3]]),
                        targets=torch.tensor([[False, True, False, False]]),
                        block=torch.tensor([[False, True, True, True]]))
    probs = torch.tensor([[[0, 0, 0, 1.0],
                           [0, 0.8, 0.1, 0.1],  # target, correct and unsure (0.8 < 0.9)
                           [0, 0.7, 0.2, 0.1],  # non-target, wrong (argmax 1 != 2) and confident (> 0.6)
                           [0, 0.5, 0.1, 0.4]]])  # non-target, wrong but not confident
    log_probs = probs.log().requires_grad_()
    loss = wino_plus_loss(log_probs, rows, MASK, WinoPlusLossWeights(w_min=0.1, w_max=1.0))

    def entropy(p):
        return -sum(v * torch.tensor(v).log() for v in p if v > 0)

    ce, h_target, h_wrong = -torch.tensor(0.8).log(), entropy([0.8, 0.1, 0.1]), entropy([0.7, 0.2, 0.1])
    assert loss.unsure_targets == 1 and loss.confident_errors == 1
    assert torch.isclose(loss.total, ce + 0.1 * h_target - 1.0 * h_wrong)
    assert loss.ce == pytest.approx(float(ce)) and loss.entropy_max == pytest.approx(float(h_wrong))
    loss.total.backward()
    assert log_probs.grad[0, 3].abs().sum() == 0 and log_probs.grad[0, 0].abs().sum() == 0

    sure = probs.clone()
    sure[0, 1] = torch.tensor([0, 0.95, 0.03, 0.02])  # now sure: no entropy-minimisation term
    assert wino_plus_loss(sure.log(), rows, MASK).unsure_targets == 0


def test_finetune_lowers_the_wino_plus_loss_and_threshold_decoding_runs(sudoku):
    task, tokenizer, examples, x = sudoku
    recorded = decode_recorded(wino_plus_model(tokenizer), x, tokenizer.mask_id, RECORDING_SPEC)
    accept, windows = recorded.accept_steps(tokenizer.mask_id), recorded.window_index(tokenizer.mask_id)
    rows = build_rows([Trajectory(recorded.result.tokens[r], accept[r], windows[r], r, 0.0) for r in range(len(x))],
                      tokenizer.mask_id)

    def full_loss():
        with torch.no_grad():
            return float(wino_plus_loss(subs_log_probs(net(rows.inputs, loops=3).logits, tokenizer.mask_id), rows,
                                        tokenizer.mask_id).ce)

    # A fresh student, so the targets are not already its own predictions.
    net = perturbed_model(n_layers=3, vocab=tokenizer.vocab_size, std=0.1, core=(1, 2), max_loops=3, seed=5).float()
    before = full_loss()
    history = finetune_wino_plus(net, rows, tokenizer.mask_id, steps=25, lr=3e-3, batch_size=8, seed=0)
    assert full_loss() < 0.75 * before
    assert {h["loops"] for h in history} == {1, 2, 3}
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    assert not net.training
    threshold = SamplerConfig.from_flags(sampler="threshold", threshold=0.9, temperature=0.0, loops=3)
    report = task_accuracy(build_decoder(net, None, threshold, tokenizer.mask_id), tokenizer, task, examples)
    assert report.n == len(examples) and 0 < report.forward_passes <= task.answer_length


def test_early_stopping_keeps_the_best_scored_weights_and_stops_after_patience():
    from loopdlm.train.wino_plus import EarlyStopping

    net = perturbed_model(n_layers=2, vocab=7, std=0.1, core=(0, 1), max_loops=2, seed=1).float()
    scores = iter([0.5, 0.9, 0.1, 0.2])
    stopper = EarlyStopping(score=lambda model: next(scores), every=2, patience=2)
    snapshots, stopped_at = {}, None
    for step in (0, 2, 4, 6):
        with torch.no_grad():
            for param in net.parameters():
                param.add_(0.01 * (step + 1))
        snapshots[step] = {k: v.clone() for k, v in net.state_dict().items()}
        if stopper.check(net, step):
            stopped_at = step
            break
    assert stopped_at == 6 and stopper.best_step == 2
    assert stopper.scores == [(0, 0.5), (2, 0.9), (4, 0.1), (6, 0.2)]
    stopper.restore(net)
    assert all(torch.equal(v, snapshots[2][k]) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------------------- block KV cache


def block_canvas(rows=3, length=20, prompt=8, seed=2) -> torch.Tensor:
    return canvas(rows=rows, length=length, prompt=prompt, seed=seed)


def test_cached_wino_shadow_equals_uncached_block_causal_computation():
    net = perturbed_model(n_layers=3, core=(1, 2), max_loops=2)
    tokens = block_canvas()
    tokens[:, 8:11] = torch.tensor([3, 4, 5])
    window, block = slice(8, 12), 4
    cached = ShadowBlock(CachedBlockPredictor(net, MASK, FixedLoops(2), block_size=block))
    cached.begin_window(tokens, window)  # caches the two clean prompt blocks
    out = cached(tokens, window, 0.0)

    columns = torch.arange(window.stop)
    base = block_causal_mask(columns, columns, block)
    extended = torch.cat((tokens[:, :window.stop], torch.full((3, 4), MASK)), dim=1)
    with torch.no_grad():
        logits = net(extended, loops=2, position_ids=shadow_position_ids(torch.arange(window.stop)[None], window),
                     attn_mask=shadow_block_mask(base, window, window.stop)[None, None]).logits
    reference = subs_log_probs(logits, MASK)
    finite = reference.isfinite()
    assert torch.allclose(out.log_probs[finite[:, window]], reference[:, window][finite[:, window]], atol=1e-9)
    shadow = reference[:, window.stop:]
    assert torch.allclose(out.shadow_log_probs[shadow.isfinite()], shadow[shadow.isfinite()], atol=1e-9)


def test_cached_wino_without_verification_equals_cached_capped_threshold():
    net = perturbed_model(n_layers=3, core=(1, 2), max_loops=2)
    x = block_canvas(length=28)
    wino = generate(ShadowBlock(CachedBlockPredictor(net, MASK, FixedLoops(2), block_size=10)), x,
                    WinoSelector(0.4, tau2=0.0), MASK, block_length=10, align_windows=True, temperature=0.0)
    plain = generate(CachedBlockPredictor(net, MASK, FixedLoops(2), block_size=10), x, CappedThreshold(0.4), MASK,
                     block_length=10, align_windows=True, temperature=0.0)
    assert torch.equal(wino.tokens, plain.tokens)
    assert wino.stats.committed_per_step == plain.stats.committed_per_step


def test_cached_wino_revokes_and_fills_every_block():
    net = perturbed_model(n_layers=3, core=(1, 2), max_loops=2)
    x = block_canvas(length=28)
    result = generate(ShadowBlock(CachedBlockPredictor(net, MASK, FixedLoops(2), block_size=10)), x,
                      WinoSelector(0.2, 0.9), MASK, block_length=10, align_windows=True, temperature=0.0)
    assert result.stats.remasked > 0 and not (result.tokens == MASK).any()
    assert torch.equal(result.tokens[:, :8], x[:, :8])
    assert result.stats.forward_passes == len(result.stats.committed_per_step) <= 20 + 3
