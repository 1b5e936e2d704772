"""Training runs a new user can trust: reproducible starts, one trainer per run folder, checkpoints on SIGTERM,
tokenizers checked by content, and file-system failures reported in one line (issue 13)."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loopdlm.cli import main
from loopdlm.data.tokenizers import CharTokenizer
from loopdlm.errors import UserError
from loopdlm.models import ModelConfig
from loopdlm.train import checkpoint_files as checkpoint_module
from loopdlm.train import latest_checkpoint, read_training_state
from loopdlm.train import run_lock as run_lock_module
from loopdlm.train.run_lock import RunLock
from loopdlm.workflow import auto_threads, build_model, busy_cores
from test_train import InterruptAfter, make_trainer, random_corpus, run_config, train_records

SRC = str(Path(__file__).resolve().parent.parent / "src")
TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.core_start=1", "model.core_end=2",
        "model.max_loops=2", "data.seq_len=32", "train.batch_size=4", "train.eval_every=0", "train.eval_batches=1",
        "train.ckpt_every=1000", "train.log_every=1", "train.warmup_steps=1"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "mini.txt"
    path.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(300)))
    return path


def train_args(tmp_path, corpus, run="run", *extra):
    return ["train", "--config", "tiny-cpu", *TINY, f"data.source=text:{corpus}",
            f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / run}", *extra]


def one_line_error(capsys, code: int, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and pattern in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------- reproducible init


def test_initial_weights_follow_train_seed_and_leave_the_global_generator_alone():
    config = ModelConfig(vocab_size=11, n_layers=2, d_model=32, n_heads=2)
    torch.manual_seed(1)
    first = build_model(ModelConfig(**vars(config)), 11, seed=0).state_dict()
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = build_model(ModelConfig(**vars(config)), 11, seed=0).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = build_model(ModelConfig(**vars(config)), 11, seed=1).state_dict()
    assert not torch.equal(first["embed.weight"], other["embed.weight"])


def test_the_same_train_command_gives_the_same_run(tmp_path, corpus, capsys):
    for run, global_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(global_seed)  # whatever consumed the global generator before must not matter
        assert main(train_args(tmp_path, corpus, run, "train.steps=2", "train.seed=0")) == 0
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


# --------------------------------------------------------------------------------------- metrics restart


def test_a_fresh_start_sets_the_dead_runs_metrics_aside(tmp_path):
    tokens = random_corpus()
    config = run_config(ckpt_every=5)
    with pytest.raises(KeyboardInterrupt):  # killed before its first checkpoint
        make_trainer(config, tmp_path, tokens, train_source=InterruptAfter(tokens, batch_size=4, seed=1,
                                                                           fail_at=4)).fit()
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3]
    make_trainer(config, tmp_path, tokens).fit()
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4, 5, 6]
    aside = [json.loads(line)["step"] for line in (tmp_path / "metrics.old-1.jsonl").read_text().splitlines()]
    assert aside == [1, 2, 3]
    # All checkpoints deleted by hand: the next run starts from scratch, with a clean metrics file again.
    shutil.rmtree(tmp_path / "checkpoints")
    make_trainer(config, tmp_path, tokens).fit()
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "metrics.old-2.jsonl").is_file()


# ------------------------------------------------------------------------------------------ run lock


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path, corpus, capsys):
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        with pytest.raises(UserError, match=f"another trainer \\(pid {os.getpid()}\\)"):
            make_trainer(run_config(steps=1), tmp_path / "run", random_corpus()).fit()
        one_line_error(capsys, main(train_args(tmp_path, corpus, "run", "train.steps=1")), "another trainer")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert make_trainer(run_config(steps=1), tmp_path / "run", random_corpus()).fit().step == 1


def test_the_lock_of_a_killed_trainer_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from loopdlm.train.run_lock import RunLock\n"
                               f"with RunLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        make_trainer(run_config(steps=1), tmp_path, random_corpus()).fit()
    holder.kill()
    holder.wait()
    assert make_trainer(run_config(steps=1), tmp_path, random_corpus()).fit().step == 1


# ------------------------------------------------------------------------------------ tokenizer hash


def test_resume_and_init_from_compare_the_tokenizer_contents_not_only_its_size(tmp_path):
    original, swapped = CharTokenizer.from_text("abcdefgh"), CharTokenizer.from_text("abcdefgz")
    assert original.vocab_size == swapped.vocab_size
    make_trainer(run_config(steps=2), tmp_path / "run", random_corpus(), tokenizer=original).fit()
    with pytest.raises(UserError, match="different tokenizer"):
        make_trainer(run_config(steps=4), tmp_path / "run", random_corpus(), tokenizer=swapped).fit()
    assert make_trainer(run_config(steps=4), tmp_path / "run", random_corpus(), tokenizer=original).fit().step == 4
    init = run_config(steps=1, init_from=str(tmp_path / "run"))
    with pytest.raises(UserError, match="train.init_from .* different tokenizer"):
        make_trainer(init, tmp_path / "tuned", random_corpus(), tokenizer=swapped).fit()


# ------------------------------------------------------------------------------------------- signals


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(tmp_path, corpus):
    args = train_args(tmp_path, corpus, "run", "train.steps=100000")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "loopdlm", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stderr:
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received: saving a checkpoint" in err and "Traceback" not in err
    step = read_training_state(tmp_path / "run")["step"]
    assert step >= 2 and f"stopped by SIGTERM after step {step}; checkpoint saved" in err
    assert [r["step"] for r in train_records(tmp_path / "run")] == list(range(1, step + 1))

    assert main(train_args(tmp_path, corpus, "run", f"train.steps={step + 2}")) == 0
    assert [r["step"] for r in train_records(tmp_path / "run")] == list(range(1, step + 3))


# ---------------------------------------------------------------------------------------- latest pointer


def test_latest_pointing_outside_checkpoints_is_not_followed(tmp_path):
    for run, steps in (("mine", 1), ("other", 3)):
        make_trainer(run_config(steps=steps, ckpt_every=1, keep_last=0), tmp_path / run, random_corpus()).fit()
    root = tmp_path / "mine" / "checkpoints"
    own = root / "step_00000001"
    for pointer in ("../../other/checkpoints/step_00000003", str(tmp_path / "other/checkpoints/step_00000003")):
        (root / "latest").write_text(pointer + "\n")
        assert latest_checkpoint(tmp_path / "mine") == own
    (root / "latest").write_text("step_00000009\n")
    (root / "step_00000009").symlink_to(tmp_path / "other" / "checkpoints" / "step_00000003")
    assert latest_checkpoint(tmp_path / "mine") == own


# -------------------------------------------------------------------------------- one-line failures


def test_out_dir_or_cache_dir_that_is_a_file(tmp_path, corpus, capsys):
    (tmp_path / "run").write_text("not a folder")
    one_line_error(capsys, main(train_args(tmp_path, corpus, "run", "train.steps=1")), "is a file, not a folder")
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    one_line_error(capsys, main(train_args(tmp_path, corpus, "run2", "train.steps=1", f"data.cache_dir={cache}")),
                   "data.cache_dir")
    one_line_error(capsys, main(["prepare", f"text:{corpus}", "--cache-dir", str(cache)]), "is a file, not a folder")


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, corpus, capsys, monkeypatch):
    assert main(train_args(tmp_path, corpus, "run", "train.steps=2")) == 0
    before = latest_checkpoint(tmp_path / "run")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    err = one_line_error(capsys, main(train_args(tmp_path, corpus, "run", "train.steps=3")), "No space left")
    assert str(before) in err
    assert latest_checkpoint(tmp_path / "run") == before
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", before.name]


def test_disk_full_during_prepare_leaves_no_corpus_that_looks_complete(tmp_path, corpus, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CharTokenizer, "save", full)
    one_line_error(capsys, main(["prepare", f"text:{corpus}", "--cache-dir", str(tmp_path / "cache")]),
                   "No space left on device")
    assert not list((tmp_path / "cache").rglob("manifest.json")) and not list((tmp_path / "cache").rglob("*.tmp"))
    monkeypatch.undo()
    assert main(["prepare", f"text:{corpus}", "--cache-dir", str(tmp_path / "cache")]) == 0


def test_read_only_run_folder(tmp_path, corpus, capsys, monkeypatch):
    def read_only(*args, **kwargs):  # what open() raises in a read-only folder (chmod does not stop root)
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run" / ".lock"))

    monkeypatch.setattr(run_lock_module, "open", read_only, raising=False)
    one_line_error(capsys, main(train_args(tmp_path, corpus, "run", "train.steps=1")), "Permission denied")


def test_a_pickle_in_state_pt_is_refused_without_pytorchs_advice(tmp_path):
    make_trainer(run_config(steps=1), tmp_path, random_corpus()).fit()
    state = latest_checkpoint(tmp_path) / "state.pt"
    torch.save({"step": 1, "payload": logging.getLogger("x")}, state)  # an arbitrary Python object
    with pytest.raises(UserError, match="not a loopdlm training state") as err:
        read_training_state(tmp_path)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------- first hour


def test_extending_a_finished_run_warns_that_the_cosine_schedule_is_stretched(tmp_path, caplog):
    make_trainer(run_config(steps=4), tmp_path, random_corpus()).fit()
    with caplog.at_level(logging.WARNING, logger="loopdlm.train.trainer"):
        make_trainer(run_config(steps=8), tmp_path, random_corpus()).fit()
    assert "train.steps 4 -> 8" in caplog.text and "train.lr_schedule=constant" in caplog.text


def test_automatic_threads_use_the_idle_cores():
    assert auto_threads(cores=2, load=0.1) == 2
    assert auto_threads(cores=2, load=1.2) == 1
    assert auto_threads(cores=2, load=7.0) == 1
    assert auto_threads(cores=16, load=0.0, processes=4) == 4


def test_busy_cores_sees_a_spinning_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = busy_cores(window=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.7 <= busy <= (os.cpu_count() or 1) + 1e-6


def test_saved_configs_hold_absolute_paths(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "tiny-cpu", *TINY, "train.steps=1", "data.source=text:mini.txt",
                 "data.cache_dir=cache", "train.out_dir=run"]) == 0
    saved = json.loads((latest_checkpoint(tmp_path / "run") / "config.json").read_text())
    assert saved["data"]["source"] == f"text:{corpus}" and saved["data"]["cache_dir"] == str(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--loops", "1", "--batches", "1",
                 "--batch-size", "2"]) == 0
    assert not (elsewhere / "data_cache").exists()


def test_training_forwards_ask_blocks_for_no_cache_views(monkeypatch):
    # A compiled block that returns views of its qkv projection makes aot_autograd replay them on every call;
    # training never needs them, so its forwards (the ones train.compile compiles) must not request them.
    from conftest import make_model
    from loopdlm.models.layers import Block

    requested = []
    forward = Block.forward

    def recording(self, *args, **kwargs):
        result = forward(self, *args, **kwargs)
        requested.append(result[1] is not None)
        return result

    monkeypatch.setattr(Block, "forward", recording)
    model = make_model()
    tokens = torch.randint(0, 22, (2, 8))
    model(tokens, loops=2).logits.sum().backward()
    assert requested and not any(requested)
    requested.clear()
    out = model(tokens, loops=2, return_present=True)
    assert all(requested) and len(out.present) == len(requested)
