"""Task data with answer-only masking, task accuracy, and the finetune / eval-task / attention commands end to end."""

import json

import pytest
import torch
from torch import nn

from loopdlm.cli import main
from loopdlm.data.batches import RowSource
from loopdlm.data.task_source import (
    answer_canvas,
    encode_task,
    split_of,
    task_examples,
    task_of,
    task_rows,
    task_tokenizer,
)
from loopdlm.data.task_spec import get_task
from loopdlm.diffusion.masked import MaskedDiffusion
from loopdlm.errors import UserError
from loopdlm.eval.tasks import task_accuracy
from loopdlm.models.transformer import ModelConfig, TransformerOutput
from loopdlm.sampling import SamplerConfig, build_decoder
from loopdlm.train.checkpoint_files import load_checkpoint_config, resolve_checkpoint


def test_answer_only_masking_never_noises_prompt_tokens():
    task = get_task("add:digits=2")
    rows = encode_task(task, task_examples(task, 64, seed=0), task_tokenizer(task))
    source = RowSource(task_rows(rows), batch_size=32, seed=0)
    objective = MaskedDiffusion(mask_id=0)
    generator = torch.Generator().manual_seed(0)
    seen_masked = torch.zeros(rows.tokens.shape[1], dtype=torch.bool)
    for _ in range(4):
        x0, noisable = source.next_batch()
        assert noisable[:, :rows.prompt_len].sum() == 0 and noisable[:, rows.answer_slice].all()
        captured = []

        def denoiser(xt):
            captured.append(xt)
            return torch.zeros(*xt.shape, 20)

        # t = 1 masks (almost) every noisable token: the prompt must still come through untouched.
        terms = objective.nelbo(denoiser, x0, generator, noisable, t=torch.ones(x0.shape[0]))
        xt = captured[0]
        assert torch.equal(xt[:, :rows.prompt_len], x0[:, :rows.prompt_len])
        seen_masked |= (xt == 0).any(dim=0)
        assert terms.n_tokens == 32 * rows.answer_len
    assert seen_masked[rows.answer_slice].all() and not seen_masked[:rows.prompt_len].any()


def test_task_splits_are_disjoint_and_deterministic():
    task = get_task("add:digits=2")
    train = task_examples(task, 300, seed=1, split="train")
    test = task_examples(task, 50, seed=1, split="test", unique=True)
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in test})
    assert all(split_of(e.prompt) == "test" for e in test) and len({e.prompt for e in test}) == 50
    assert task_examples(task, 50, seed=1, split="test", unique=True) == test
    with pytest.raises(UserError, match="fewer than"):
        task_examples(get_task("add:digits=1"), 50, seed=0, split="test", unique=True)


def test_task_batch_source_resumes_where_it_stopped():
    task = get_task("sudoku4")
    rows = encode_task(task, task_examples(task, 20, seed=0), task_tokenizer(task))
    source = RowSource(task_rows(rows), batch_size=8, seed=3)
    source.next_batch()
    state = source.state_dict()
    expected = [source.next_batch()[0] for _ in range(3)]
    resumed = RowSource(task_rows(rows), batch_size=8, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in expected)


class AdditionOracle(nn.Module):
    """A stand-in denoiser that reads 'a+b=' from each row and puts all probability on the digits of a + b
    (or of a + b + 1 when `off_by_one`), so accuracy must come out exactly 1 (or 0)."""

    def __init__(self, tokenizer, prompt_len, answer_len, off_by_one=False):
        super().__init__()
        self.config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=1, d_model=8, n_heads=2)
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.prompt_len, self.answer_len = tokenizer, prompt_len, answer_len
        self.off_by_one = off_by_one

    def forward(self, tokens, loops=1, loop_exit=None, **kwargs):
        logits = torch.full((*tokens.shape, self.config.vocab_size), -30.0)
        for row, ids in enumerate(tokens.tolist()):
            a, b = self.tokenizer.decode(ids[:self.prompt_len]).rstrip("=").split("+")
            answer = str(int(a) + int(b) + self.off_by_one)
            target = self.tokenizer.encode(answer) + [self.tokenizer.eos_id] * (self.answer_len - len(answer))
            for column, token in enumerate(target):
                logits[row, self.prompt_len + column, token] = 30.0
        return TransformerOutput(logits=logits, core_applications=torch.full((tokens.shape[0],), float(loops)))


@pytest.mark.parametrize("off_by_one, expected", [(False, 1.0), (True, 0.0)])
def test_task_accuracy_counts_verified_answers(off_by_one, expected):
    task = get_task("add:digits=2")
    tok = task_tokenizer(task)
    examples = task_examples(task, 10, seed=0, split="test", unique=True)
    oracle = AdditionOracle(tok, task.prompt_length, task.answer_length, off_by_one)
    spec = SamplerConfig.from_flags(sampler="topk", steps=3, loops=2)
    report = task_accuracy(build_decoder(oracle, None, spec, tok.mask_id), tok, task, examples, batch_size=4)
    assert report.accuracy == expected and report.n == 10
    assert report.predictions[0] == str(sum(map(int, examples[0].prompt[:-1].split("+"))) + off_by_one)
    assert report.core_applications == pytest.approx(2.0 * 3)  # 3 forward passes of S = 2 per example


def test_answer_canvas_masks_exactly_the_answer_region():
    task = get_task("sudoku4")
    tok = task_tokenizer(task)
    rows = encode_task(task, task_examples(task, 3, seed=0), tok)
    canvas = answer_canvas(rows, tok.mask_id)
    assert (canvas[:, rows.answer_slice] == tok.mask_id).all()
    assert torch.equal(canvas[:, :rows.prompt_len], rows.tokens[:, :rows.prompt_len])


def _run_cli(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_finetune_eval_task_and_attention_commands_run_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["model.d_model=32", "model.n_heads=2", "train.batch_size=16", "train.steps=20", "train.eval_every=10",
            "train.warmup_steps=5", "train.device=cpu", f"train.out_dir={run}"]
    out = _run_cli(capsys, ["finetune", "--task", "add:digits=2", "--config", "add-tiny", "--train-examples", "200",
                            "--val-examples", "32", *tiny])
    assert "for 20 steps" in out
    config = load_checkpoint_config(run)
    assert task_of(config.data).name == "add" and config.data.seq_len == 6 + 3
    assert (resolve_checkpoint(run) / "tokenizer" / "tokenizer.json").is_file()

    results = json.loads(_run_cli(capsys, ["eval-task", "--checkpoint", str(run), "--n", "8", "--loops", "1", "3",
                                           "--device", "cpu", "--json"]))
    assert [r["loops"] for r in results] == [1, 3] and all(r["n"] == 8 for r in results)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    assert results[1]["core_applications"] == pytest.approx(3 * results[1]["forward_passes"])

    # `eval` on a finetune checkpoint scores the task's answers (it used to send the task to the corpus loader)
    bounds = json.loads(_run_cli(capsys, ["eval", "--checkpoint", str(run), "--loops", "1", "3", "--batches", "2",
                                          "--device", "cpu", "--json"]))
    assert [r["loops"] for r in bounds] == [1, 3] and all(r["tokens"] > 0 and r["bits_per_char"] is None
                                                          for r in bounds)

    records = json.loads(_run_cli(capsys, ["attention", "--checkpoint", str(run), "--n", "8", "--times", "0.5",
                                           "--loops", "3", "--device", "cpu", "--json"]))
    assert [(r["layer"], r["loop"]) for r in records] == [(0, 0), (1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3),
                                                        (3, 0)]
    assert all(r["masked_mass"] + r["unmasked_mass"] == pytest.approx(1.0, abs=1e-5) for r in records)
    pytest.importorskip("matplotlib")
    _run_cli(capsys, ["attention", "--checkpoint", str(run), "--n", "8", "--times", "0.3", "0.9", "--device", "cpu",
                      "--out", str(tmp_path / "attention.png")])
    assert (tmp_path / "attention.png").stat().st_size > 1000


def test_finetune_from_a_checkpoint_keeps_its_model_and_tokenizer(tmp_path, capsys):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    common = ["model.d_model=32", "model.n_heads=2", "train.batch_size=8", "train.steps=3", "train.eval_every=0",
              "train.warmup_steps=1", "train.device=cpu"]
    _run_cli(capsys, ["finetune", "--task", "add:digits=2", "--config", "add-tiny", "--train-examples", "16",
                      "--val-examples", "8", *common, f"train.out_dir={base}"])
    # The preset asks for d_model 128; the checkpoint's 32 must win, while a loop setting may still change.
    _run_cli(capsys, ["finetune", "--task", "add:digits=2", "--config", "add-tiny", "--init", str(base),
                      "--train-examples", "16", "--val-examples", "8", "model.max_loops=2",
                      *[o for o in common if not o.startswith("model.d_model")], f"train.out_dir={tuned}"])
    config = load_checkpoint_config(tuned)
    assert config.model.d_model == 32 and config.model.max_loops == 2 and config.train.init_from == str(base)
