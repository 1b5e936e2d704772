"""WINO+ and CoDD prior fitting run on the one Trainer: bit-exact resume and metrics.jsonl; old configs load."""

import json
import os
import signal

import torch

from loopdlm.cli import main
from loopdlm.config import RunConfig
from loopdlm.data.batches import TensorBatchSource
from loopdlm.diffusion import LogLinear, MaskedDiffusion
from loopdlm.sampling.coupling import load_codd_layer
from loopdlm.train import codd_training
from loopdlm.train.codd_training import CoDDTrainConfig, train_codd_prior
from loopdlm.train.wino_plus import SupervisedAnchor, WinoPlusRows, finetune_wino_plus

from conftest import make_model
from test_coupling import tiny_checkpoint  # noqa: F401 (a fixture)

VOCAB, MASK = 9, 8


def wino_rows(n=24, length=10, seed=0) -> WinoPlusRows:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, MASK, (n, length), generator=generator)
    hidden = torch.rand(n, length, generator=generator) < 0.5
    targets = hidden & (torch.rand(n, length, generator=generator) < 0.5)
    return WinoPlusRows(clean.masked_fill(hidden, MASK), clean, targets, torch.ones(n, length, dtype=torch.bool))


def records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def finetune(out_dir, steps):
    torch.manual_seed(0)
    model = make_model(vocab_size=VOCAB, n_layers=3, core=(1, 2), max_loops=3, seed=4)
    anchor = SupervisedAnchor(torch.randint(0, MASK, (16, 10)), torch.ones(16, 10, dtype=torch.bool),
                              MaskedDiffusion(MASK), weight=0.5, batch_size=4)
    history = finetune_wino_plus(model, wino_rows(), MASK, steps=steps, lr=3e-3, batch_size=4, seed=1,
                                 anchor=anchor, out_dir=out_dir, log_every=1)
    return model, history


def test_wino_plus_training_resumes_bit_exactly_and_writes_metrics(tmp_path):
    straight, history = finetune(tmp_path / "a", steps=6)
    finetune(tmp_path / "b", steps=3)
    resumed, rest = finetune(tmp_path / "b", steps=6)  # continues from the step-3 checkpoint
    assert [h["loops"] for h in rest] == [h["loops"] for h in history[3:]]
    assert [h["loss"] for h in rest] == [h["loss"] for h in history[3:]]
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    train = [r for r in records(tmp_path / "b") if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert {"ce", "entropy_min", "entropy_max", "nelbo"} <= set(train[0])
    assert {h["loops"] for h in history} <= {1, 2, 3}


def pair_source(seed=0):
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 4, (64, 1), generator=generator)
    return TensorBatchSource(torch.cat([first, first + 4], dim=1).repeat(1, 2), batch_size=8, seed=0)


def oracle(tokens):
    return torch.log_softmax(torch.zeros(*tokens.shape, VOCAB).index_fill_(-1, torch.tensor([MASK]), -1e9), -1)


def fit_prior(out_dir, steps, topk=0):
    config = CoDDTrainConfig(n_states=4, window=4, steps=steps, lr=0.1, topk=topk, pool_batches=3, seed=2)
    return train_codd_prior(oracle, pair_source(), MaskedDiffusion(MASK, LogLinear()), VOCAB, config,
                            out_dir=out_dir)


def test_codd_prior_training_resumes_bit_exactly_and_writes_metrics(tmp_path):
    for topk in (0, 3):
        straight = fit_prior(tmp_path / f"a{topk}", 6, topk)
        fit_prior(tmp_path / f"b{topk}", 3, topk)
        resumed = fit_prior(tmp_path / f"b{topk}", 6, topk)
        assert resumed.history == straight.history[3:]
        for name, tensor in straight.prior.state_dict().items():
            assert torch.equal(tensor, resumed.prior.state_dict()[name]), name
        train = [r for r in records(tmp_path / f"b{topk}") if r["split"] == "train"]
        assert [r["step"] for r in train] == [3, 6] and "factorised" in train[0]  # log_every 50: each run's end


def train_codd_command(run_dir, out, *extra) -> int:
    return main(["train-codd", "--checkpoint", str(run_dir), "--out", str(out), "--states", "3", "--window", "8",
                 "--steps", "4", "--batch-size", "4", "--lr", "0.1", "--device", "cpu", *extra])


def prior_weights(folder, vocab_size) -> dict:
    return load_codd_layer(folder, vocab_size)[0].state_dict()


def test_rerunning_an_interrupted_train_codd_command_continues_the_run_exactly(tiny_checkpoint, tmp_path,
                                                                             monkeypatch, capsys):
    run_dir, tokenizer = tiny_checkpoint
    assert train_codd_command(run_dir, tmp_path / "straight") == 0
    straight = prior_weights(tmp_path / "straight", tokenizer.vocab_size)
    unpatched, passes = codd_training.frozen_log_probs, []

    def counted(interrupt_at=None):
        def frozen_log_probs(*args):
            log_probs = unpatched(*args)

            def call(tokens):
                passes.append(1)
                if len(passes) == interrupt_at:  # topk 0: one frozen pass per step
                    os.kill(os.getpid(), signal.SIGINT)
                return log_probs(tokens)

            return call
        return frozen_log_probs

    # Ctrl-C during step 1: the trainer sees it as step 2 starts and ends the run after it, with a checkpoint.
    monkeypatch.setattr(codd_training, "frozen_log_probs", counted(interrupt_at=1))
    assert train_codd_command(run_dir, tmp_path / "resumed") == 128 + signal.SIGINT
    assert "run the same command to resume" in capsys.readouterr().err
    passes.clear()
    monkeypatch.setattr(codd_training, "frozen_log_probs", counted())
    assert train_codd_command(run_dir, tmp_path / "resumed") == 0  # the same command
    assert len(passes) == 2  # steps 3 and 4 only
    resumed = prior_weights(tmp_path / "resumed", tokenizer.vocab_size)
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
    steps = [r["step"] for r in records(tmp_path / "resumed") if r["split"] == "train"]
    assert steps[-1] == 4 and len(steps) == len(set(steps))
    # Once more on the finished run: nothing to do, the same prior. Other settings are refused, losing nothing.
    assert train_codd_command(run_dir, tmp_path / "resumed") == 0
    assert train_codd_command(run_dir, tmp_path / "resumed", "--window", "4") == 2
    assert "window 8 -> 4" in capsys.readouterr().err
    for name, tensor in prior_weights(tmp_path / "resumed", tokenizer.vocab_size).items():
        assert torch.equal(tensor, straight[name]), name


def test_old_configs_with_run_time_model_fields_and_task_sources_still_load():
    config = RunConfig.from_dict({"model": {"checkpoint_loops": True, "max_loops": 3},
                                  "data": {"source": "task:sudoku4"}})
    assert config.train.checkpoint_loops and config.data.task == "sudoku4"
    assert "max_loops" not in config.model.architecture()
