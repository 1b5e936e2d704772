import dataclasses
import json
import math

import pytest
import torch

from loopdlm.config import RunConfig
from loopdlm.diffusion import MaskedDiffusion, NelboTerms, make_schedule, subs_log_probs
from loopdlm.diffusion.masked import NelboHooks, average_terms, logits_at, masked_token_nll
from loopdlm.errors import UserError
from loopdlm.models import LoopedTransformer, ModelConfig
from loopdlm.train import (
    EMA,
    TensorBatchSource,
    Trainer,
    expected_loops,
    latest_checkpoint,
    learning_rate,
    load_checkpoint_config,
    load_model_weights,
    loops_for_step,
    measure_matmul_flops,
    read_training_state,
    read_weights,
    save_checkpoint,
    training_flops,
)
from loopdlm.train import checkpoint_files as checkpoint_module
from loopdlm.train.distributed import DistInfo, full_model_state


VOCAB = 13
MASK_ID = VOCAB - 1
SEQ_LEN = 16


def run_config(core: tuple[int, int] = (0, 1), tie: bool = False, **train) -> RunConfig:
    """2 layers, d=32, a one-layer core looped up to 3 times; CPU, fp32, logging every step."""
    config = RunConfig()
    config.model = ModelConfig(vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=2, core_start=core[0],
                               core_end=core[1], max_loops=3, tie_embeddings=tie)
    settings = dict(steps=6, lr=3e-3, warmup_steps=2, weight_decay=0.1, ema_decay=0.9, eval_batches=2,
                    eval_samples=2, log_every=1, eval_every=0, ckpt_every=0, keep_last=2, device="cpu",
                    precision="auto", seed=7)
    settings.update(train)
    for key, value in settings.items():
        setattr(config.train, key, value)
    config.sample.eval_loops = [1, 3]
    return config


def random_corpus(rows: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK_ID, (rows, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def make_trainer(config: RunConfig, out_dir, tokens: torch.Tensor, batch_size: int = 4, objective=None,
                 train_source=None, with_val: bool = True, init_seed: int = 0, **kwargs) -> Trainer:
    torch.manual_seed(init_seed)
    model = LoopedTransformer(config.model)
    source = train_source or TensorBatchSource(tokens, batch_size=batch_size, seed=1)
    val = TensorBatchSource(random_corpus(8, seed=99), batch_size=4, seed=2) if with_val else None
    return Trainer(config, model, objective or MaskedDiffusion(MASK_ID), source, val, out_dir, **kwargs)


def train_records(out_dir) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


class RowKeyedNoise(NelboHooks):
    """MDLM NELBO whose t and mask for each row are a function of that row's tokens only: a row's loss is then the
    same whichever micro-batch or rank it lands in, so differently split batches can be compared exactly."""

    def __init__(self, mask_id: int = MASK_ID):
        self.mask_id = mask_id
        self.schedule = make_schedule("loglinear")

    def nelbo(self, denoiser, x0, generator=None, noisable=None) -> NelboTerms:
        times, draws = [], []
        for row in x0.tolist():
            key = sum(token * 31**i for i, token in enumerate(row)) % 2**61
            row_generator = torch.Generator().manual_seed(key)
            times.append(1e-3 + (1 - 1e-3) * torch.rand(1, generator=row_generator))
            draws.append(torch.rand(x0.shape[1], generator=row_generator))
        t, u = torch.cat(times).to(x0.device), torch.stack(draws).to(x0.device)
        masked = u < self.schedule.mask_probability(t)[:, None]
        if noisable is not None:
            masked &= noisable
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        nll = masked_token_nll(logits_at(denoiser, xt, masked), x0, masked, self.schedule.weight(t)[:, None],
                               self.mask_id).sum(dim=1)
        tokens = (noisable.sum(dim=1) if noisable is not None else torch.full_like(nll, x0.shape[1])).float()
        return NelboTerms(nll_sum=nll.sum(), n_tokens=tokens.sum(), per_row=nll / tokens.clamp(min=1))

    def bound(self, denoiser, x0, generator=None, noisable=None, samples=1) -> NelboTerms:
        return average_terms([self.nelbo(denoiser, x0, generator, noisable) for _ in range(samples)])


def prompt_masks(rows: int = 24, seed: int = 0) -> torch.Tensor:
    """bool [rows, SEQ_LEN]: a random-length prompt (never noised) then the scored answer, so micro-batches
    score different numbers of tokens."""
    prompt = torch.randint(0, SEQ_LEN - 2, (rows, 1), generator=torch.Generator().manual_seed(seed))
    return torch.arange(SEQ_LEN)[None] >= prompt


class InterruptAfter(TensorBatchSource):
    """A batch source that raises KeyboardInterrupt on its `fail_at`-th batch (simulates Ctrl-C mid-run)."""

    def __init__(self, *args, fail_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.fail_at = 0, fail_at

    def next_batch(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return super().next_batch()


# ------------------------------------------------------------------------------------------------- resume


def test_resume_after_interruption_repeats_uninterrupted_run_bit_for_bit(tmp_path):
    tokens = random_corpus()
    config = run_config(grad_accum=2, ckpt_every=3, eval_every=2)
    straight = make_trainer(config, tmp_path / "a", tokens).fit()

    source = InterruptAfter(tokens, batch_size=4, seed=1, fail_at=9)  # during update 5 (2 batches per update)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(config, tmp_path / "b", tokens, train_source=source).fit()
    assert read_training_state(tmp_path / "b")["step"] == 3
    assert [r["step"] for r in train_records(tmp_path / "b")] == [1, 2, 3, 4]
    resumed = make_trainer(config, tmp_path / "b", tokens, init_seed=123).fit()

    assert [s for s, _, _ in resumed.history] == [4, 5, 6]
    assert straight.history[3:] == resumed.history  # (step, loss, S) compared with ==
    assert [(r["step"], r["loss"], r["loops"], r["tokens"], r["flops"]) for r in train_records(tmp_path / "a")] == \
        [(r["step"], r["loss"], r["loops"], r["tokens"], r["flops"]) for r in train_records(tmp_path / "b")]
    assert straight.eval_metrics == resumed.eval_metrics
    for use_ema in (False, True):
        a, b = read_weights(tmp_path / "a", use_ema), read_weights(tmp_path / "b", use_ema)
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_refuses_a_different_model_config(tmp_path):
    make_trainer(run_config(steps=1), tmp_path, random_corpus()).fit()
    wider = run_config(steps=2)
    wider.model.d_model = 64
    with pytest.raises(UserError, match="different model config.*d_model"):
        make_trainer(wider, tmp_path, random_corpus()).fit()


def test_resume_flag_requires_or_forbids_existing_checkpoints(tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        make_trainer(run_config(steps=1), tmp_path, random_corpus(), resume=True).fit()
    make_trainer(run_config(steps=1), tmp_path, random_corpus()).fit()
    with pytest.raises(UserError, match="already holds checkpoints"):
        make_trainer(run_config(steps=2), tmp_path, random_corpus(), resume=False).fit()


def test_init_from_starts_fresh_from_checkpoint_ema_weights(tmp_path):
    make_trainer(run_config(steps=3), tmp_path / "base", random_corpus()).fit()
    ema = read_weights(tmp_path / "base", use_ema=True)
    live = read_weights(tmp_path / "base", use_ema=False)
    assert not torch.equal(ema["embed.weight"], live["embed.weight"])

    config = run_config(steps=0, init_from=str(tmp_path / "base"))
    trainer = make_trainer(config, tmp_path / "tuned", random_corpus(), init_seed=5)
    result = trainer.fit()
    assert result.step == 0 and trainer.optimizer.state_dict()["state"] == {}
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, ema[name]), name


# ----------------------------------------------------------------------------------------- loop counts


def test_loop_count_is_a_fixed_function_of_seed_and_step_covering_one_to_max():
    draws = [loops_for_step(7, step, 4) for step in range(1, 401)]
    assert draws == [loops_for_step(7, step, 4) for step in range(1, 401)]  # what any other rank computes
    counts = torch.bincount(torch.tensor(draws), minlength=5)[1:]
    assert counts.min() > 70 and counts.sum() == 400  # ~100 each for a uniform draw over {1..4}
    assert draws != [loops_for_step(8, step, 4) for step in range(1, 401)]
    assert {loops_for_step(7, step, 1) for step in range(50)} == {1}


def test_trainer_draws_loops_per_step_and_plain_model_always_one(tmp_path):
    looped = make_trainer(run_config(steps=8), tmp_path / "looped", random_corpus(), with_val=False).fit()
    assert [s for _, _, s in looped.history] == [loops_for_step(7, step, 3) for step in range(1, 9)]
    plain = make_trainer(run_config(steps=4, core=(0, 0)), tmp_path / "plain", random_corpus()).fit()
    assert [s for _, _, s in plain.history] == [1, 1, 1, 1]
    assert list(plain.eval_metrics) == [1]


# ------------------------------------------------------------------------------------------- optimiser


def test_learning_rate_warmup_cosine_endpoints_and_constant():
    config = run_config(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1).train
    assert learning_rate(1, config) == pytest.approx(1e-4)
    assert learning_rate(5, config) == pytest.approx(5e-4)
    assert learning_rate(10, config) == pytest.approx(1e-3)
    assert learning_rate(60, config) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cos = 0
    assert learning_rate(110, config) == pytest.approx(1e-4)
    assert learning_rate(500, config) == pytest.approx(1e-4)
    constant = dataclasses.replace(config, lr_schedule="constant")
    assert [learning_rate(s, constant) for s in (5, 11, 110)] == pytest.approx([5e-4, 1e-3, 1e-3])
    with pytest.raises(UserError, match="lr_schedule"):
        learning_rate(1, dataclasses.replace(config, lr_schedule="linear"))


def test_ema_update_follows_decay_formula_and_swap_restores_live_weights():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    ema = EMA(params, decay=0.9)
    params[0].copy_(torch.tensor([3.0, 0.0]))
    params[1].copy_(torch.tensor([[0.0]]))
    ema.update(params)
    torch.testing.assert_close(ema.shadow[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 0]))
    ema.update(params)
    torch.testing.assert_close(ema.shadow[1], torch.tensor([[0.81 * 4.0]]))
    live = [p.clone() for p in params]
    with ema.swapped_into(params):
        torch.testing.assert_close(params[1], torch.tensor([[3.24]]))
        assert torch.equal(ema.shadow[1], live[1])  # the live weights wait in the shadow
    assert all(torch.equal(p, q) for p, q in zip(params, live))


def test_grad_accumulation_two_by_four_equals_batch_of_eight(tmp_path):
    # Prompts of random length make micro-batches score different token counts: only a token-weighted
    # reduction over the whole step (not a mean of micro-batch means) makes the two layouts agree.
    tokens, noisable = random_corpus(), prompt_masks()
    runs = {}
    for name, batch_size, accum in (("accumulated", 4, 2), ("whole", 8, 1)):
        config = run_config(steps=3, grad_accum=accum)
        source = TensorBatchSource(tokens, noisable, batch_size=batch_size, seed=1)
        trainer = make_trainer(config, tmp_path / name, tokens, objective=RowKeyedNoise(), train_source=source,
                               with_val=False)
        runs[name] = (trainer, trainer.fit())
    (accumulated, acc_result), (whole, whole_result) = runs["accumulated"], runs["whole"]
    assert [s for _, _, s in acc_result.history] == [s for _, _, s in whole_result.history]
    assert [loss for _, loss, _ in acc_result.history] == pytest.approx(
        [loss for _, loss, _ in whole_result.history], rel=1e-6)
    for (name, a), b in zip(accumulated.model.named_parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_loss_decreases_on_repetitive_corpus(tmp_path):
    base = torch.arange(SEQ_LEN) % 4  # 0 1 2 3 0 1 2 3 ...
    tokens = torch.stack([(base + shift) % 4 for shift in range(4)] * 4)
    config = run_config(steps=50, lr=1e-2, warmup_steps=5, log_every=10, ema_decay=0.5)
    torch.manual_seed(0)
    trainer = Trainer(config, LoopedTransformer(config.model), MaskedDiffusion(MASK_ID),
                      TensorBatchSource(tokens, batch_size=4, seed=1), TensorBatchSource(tokens, batch_size=4, seed=2),
                      tmp_path)
    before = trainer.evaluate()
    after = trainer.fit().eval_metrics
    for loops in (1, 3):  # ~2.6 nats/token untrained; ~1.5 after 50 steps
        assert after[loops]["nats_per_token"] < 0.7 * before[loops]["nats_per_token"]


# --------------------------------------------------------------------------------------- metrics, FLOPs


def test_metrics_log_train_and_eval_records(tmp_path):
    config = run_config(steps=4, log_every=2, eval_every=2)
    trainer = make_trainer(config, tmp_path, random_corpus())
    result = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [2, 4]
    assert set(train[0]) >= {"loss", "lr", "loops", "grad_norm", "tokens", "flops", "tokens_per_s", "flops_per_s",
                             "elapsed"}
    assert train[1]["tokens"] == 4 * 4 * SEQ_LEN
    assert [(r["step"], r["loops"]) for r in val] == [(2, 1), (2, 3), (4, 1), (4, 3)]
    for record in val[2:]:
        assert record["bits_per_token"] == pytest.approx(record["nats_per_token"] / math.log(2))
        assert record["ppl_bound"] == pytest.approx(math.exp(record["nats_per_token"]))
        assert result.eval_metrics[record["loops"]]["nats_per_token"] == record["nats_per_token"]
    assert trainer.evaluate() == trainer.evaluate() == result.eval_metrics  # fixed batches and noise


def record_readout_fractions(model) -> list[float]:
    """The share of positions each later forward of `model` reads out (1.0 without a readout_mask)."""
    fractions = []

    def record(module, args, kwargs):
        mask = kwargs.get("readout_mask")
        fractions.append(1.0 if mask is None else float(mask.float().mean()))

    model.register_forward_pre_hook(record, with_kwargs=True)
    return fractions


def test_flops_count_the_core_once_per_loop(tmp_path):
    config = run_config(core=(0, 1))
    model = LoopedTransformer(config.model)
    d, hidden, length, tokens = 32, 128, SEQ_LEN, 1000
    per_layer = 2 * (4 * d * d + 2 * d * hidden) + 4 * length * d
    extra = training_flops(model, length, 4, tokens) - training_flops(model, length, 1, tokens)
    assert extra == 3 * 3 * config.model.core_layers * per_layer * tokens  # 3 more loops, x3 for backward
    assert expected_loops(12) == 6.5

    trainer = make_trainer(run_config(steps=4), tmp_path, random_corpus(), with_val=False)
    fractions = record_readout_fractions(trainer.model)
    result = trainer.fit()
    step_tokens = 4 * SEQ_LEN
    # MDLM reads out only its masked positions, and the log counts the head FLOPs at those alone
    assert len(fractions) == len(result.history) and all(0 < f < 1 for f in fractions)
    expected = sum(training_flops(trainer.model, SEQ_LEN, s, step_tokens, f)
                   for (_, _, s), f in zip(result.history, fractions))
    assert train_records(tmp_path)[-1]["flops"] == pytest.approx(expected)


def test_flops_follow_the_rows_the_objective_actually_runs(tmp_path):
    # BD3-LM feeds [x_t ; x_0] (twice the length, with an attention mask) through the denoiser.
    from loopdlm.diffusion.block import BlockDiffusion

    trainer = make_trainer(run_config(steps=2), tmp_path, random_corpus(), objective=BlockDiffusion(MASK_ID, 4),
                           with_val=False)
    fractions = record_readout_fractions(trainer.model)
    result = trainer.fit()
    assert len(fractions) == len(result.history) and all(0 < f < 0.5 for f in fractions)  # masked x_t positions
    expected = sum(training_flops(trainer.model, 2 * SEQ_LEN, s, 2 * 4 * SEQ_LEN, f)
                   for (_, _, s), f in zip(result.history, fractions))
    assert train_records(tmp_path)[-1]["flops"] == pytest.approx(expected)
    assert train_records(tmp_path)[-1]["tokens"] == 2 * 4 * SEQ_LEN


def test_measure_matmul_flops_reports_a_positive_rate():
    rate = measure_matmul_flops("cpu", torch.float32, size=64, iters=2)
    assert math.isfinite(rate) and rate > 0


# ------------------------------------------------------------------------------------------- checkpoints


def save_step(out_dir, step: int, model: LoopedTransformer, config: RunConfig, keep_last: int = 2):
    state = full_model_state(model, DistInfo(0, 1, 0, torch.device("cpu")))
    return save_checkpoint(out_dir, step, model_state=state, ema_state=state, training_state={"step": step},
                           config=config, keep_last=keep_last)


def test_crash_mid_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    config = run_config()
    model = LoopedTransformer(config.model)
    first = save_step(tmp_path, 1, model, config)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_step(tmp_path, 2, model, config)
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_keep_last_prunes_older_checkpoints_after_the_new_one_is_complete(tmp_path):
    config = run_config()
    model = LoopedTransformer(config.model)
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step, model, config, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert latest_checkpoint(tmp_path) == root / "step_00000004"
    assert latest_checkpoint(root / "step_00000004") is None  # a step folder is not a run folder
    save_step(tmp_path, 2, model, config, keep_last=0)  # a resume from step 2 abandons steps 3 and 4
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]


def test_tied_embeddings_survive_a_save_load_round_trip(tmp_path):
    config = run_config(tie=True)
    torch.manual_seed(0)
    model = LoopedTransformer(config.model)
    folder = save_step(tmp_path, 1, model, config)
    with checkpoint_module.safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert len([k for k in handle.keys() if k in ("embed.weight", "head.weight")]) == 1
    torch.manual_seed(1)
    fresh = LoopedTransformer(config.model)
    load_model_weights(tmp_path, fresh)
    assert fresh.head.weight is fresh.embed.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor)
    assert load_checkpoint_config(folder).model == config.model


def test_unusable_checkpoints_raise_one_line_user_errors(tmp_path):
    config = run_config()
    model = LoopedTransformer(config.model)
    folder = save_step(tmp_path / "run", 1, model, config)
    cases = []

    with pytest.raises(UserError, match="checkpoint not found"):
        load_model_weights(tmp_path / "missing", model)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_model_weights(tmp_path / "empty", model)

    wider = dataclasses.replace(config.model, d_model=64)
    with pytest.raises(UserError, match="do not fit the model") as err:
        load_model_weights(folder, LoopedTransformer(wider))
    cases.append(err)

    (folder / "ema.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt weights file") as err:
        load_model_weights(folder, model, use_ema=True)
    cases.append(err)
    (folder / "state.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="corrupt training state") as err:
        read_training_state(folder)
    cases.append(err)
    (folder / "config.json").write_text("{ nope")
    with pytest.raises(UserError, match="corrupt checkpoint config") as err:
        load_checkpoint_config(folder)
    cases.append(err)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing") as err:
        load_model_weights(folder, model)
    cases.append(err)
    for err in cases:
        assert str(folder) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ data


def test_tensor_batch_source_shards_global_batches_and_resumes():
    tokens = torch.arange(10 * 2).view(10, 2)
    single = TensorBatchSource(tokens, batch_size=4, seed=3)
    ranks = [TensorBatchSource(tokens, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):  # crosses epochs (10 rows = 2 global batches + 2 skipped)
        whole, _ = single.next_batch()
        assert torch.equal(whole, torch.cat([source.next_batch()[0] for source in ranks]))
    state = single.state_dict()
    expected = [single.next_batch()[0] for _ in range(3)]
    copy = TensorBatchSource(tokens, batch_size=4, seed=3)
    copy.load_state_dict(state)
    assert all(torch.equal(copy.next_batch()[0], batch) for batch in expected)


def test_block_diffusion_adapts_its_noise_interval_on_validation_and_resumes_it(tmp_path):
    from loopdlm.diffusion.block import BlockDiffusion

    def objective():
        return BlockDiffusion(MASK_ID, block_size=4, seq_len=SEQ_LEN, adaptive_clip=True,
                              candidates=((0.0, 1.0), (0.5, 1.0)), clip_search_batches=3)

    tokens = random_corpus()
    config = run_config(eval_every=2, ckpt_every=2, steps=4)
    first = objective()
    make_trainer(config, tmp_path, tokens, objective=first).fit()
    schedule = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "schedule"]
    assert [r["step"] for r in schedule] == [2, 4]
    assert all((r["clip_low"], r["clip_high"]) in ((0.0, 1.0), (0.5, 1.0)) for r in schedule)
    assert first.clip == (schedule[-1]["clip_low"], schedule[-1]["clip_high"])
    assert read_training_state(tmp_path)["objective"] == {"clip_low": first.clip[0], "clip_high": first.clip[1]}

    resumed = objective()
    resumed.clip = (0.25, 0.75)
    config.train.steps = 4
    make_trainer(config, tmp_path, tokens, objective=resumed).fit()
    assert resumed.clip == first.clip


def test_validation_hook_gets_the_objectives_batch_count_with_their_noisable_masks(tmp_path):
    class RecordingObjective(MaskedDiffusion):
        validation_batches = 5

        def __init__(self):
            super().__init__(MASK_ID)
            self.calls = []

        def on_validation(self, denoiser, batches, log):
            self.calls.append(batches)

    val_tokens, val_noisable = random_corpus(8, seed=99), prompt_masks(8, seed=98)
    objective = RecordingObjective()
    model = LoopedTransformer(run_config().model)
    val = TensorBatchSource(val_tokens, val_noisable, batch_size=4, seed=2)
    Trainer(run_config(eval_every=2, steps=2), model, objective, TensorBatchSource(random_corpus(), batch_size=4,
                                                                                   seed=1), val, tmp_path).fit()
    (batches,) = objective.calls
    assert len(batches) == 5
    reference = TensorBatchSource(val_tokens, val_noisable, batch_size=4, seed=2)
    for x0, noisable in batches:
        expected_x0, expected_noisable = reference.next_batch()
        assert torch.equal(x0, expected_x0) and torch.equal(noisable, expected_noisable)
