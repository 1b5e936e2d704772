"""The command line end to end on a small generated corpus, and every bad-input case from the core issue."""

import json
import shutil
import subprocess
import sys

import pytest

from loopdlm.cli import main
from loopdlm.eval.denoising_viewer import embedded_document

TINY = ["model.n_layers=3", "model.d_model=32", "model.n_heads=2", "model.core_start=1", "model.core_end=2",
        "model.max_loops=3", "data.seq_len=32", "train.steps=4", "train.batch_size=4", "train.eval_every=4",
        "train.eval_batches=1", "train.ckpt_every=2", "train.log_every=2", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step training run on a generated text corpus, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(400)))
    run = root / "run"
    overrides = TINY + [f"data.source=text:{corpus}", f"data.cache_dir={root / 'cache'}", f"train.out_dir={run}"]
    assert main(["train", "--config", "tiny-cpu", *overrides]) == 0
    return root, run, overrides


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_eval_sample_end_to_end(trained_run, capsys):
    root, run, _ = trained_run
    assert (run / "checkpoints" / "latest").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val"}
    code, out, _ = run_cli(["eval", "--checkpoint", str(run), "--loops", "1", "5", "--batches", "1",
                            "--batch-size", "2", "--json"], capsys)
    assert code == 0
    reports = json.loads(out)
    assert [r["loops"] for r in reports] == [1, 5] and all(r["nats_per_token"] > 0 for r in reports)
    code, out, _ = run_cli(["sample", "--checkpoint", str(run), "--prompt", "line 1", "--num-samples", "2",
                            "--steps", "8", "--loops", "4", "--json"], capsys)
    assert code == 0
    payload = json.loads(out)
    assert len(payload["samples"]) == 2 and all(s.startswith("line 1") for s in payload["samples"])
    assert payload["stats"]["core_applications"] == 4 * payload["stats"]["row_forward_passes"]


def test_rerunning_a_finished_run_keeps_its_checkpoint(trained_run, capsys):
    root, run, overrides = trained_run
    latest = (run / "checkpoints" / "latest").read_text()
    assert main(["train", "--config", "tiny-cpu", *overrides]) == 0
    assert (run / "checkpoints" / "latest").read_text() == latest


def expect_user_error(args, capsys, pattern):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], err


def test_unknown_config_key_suggests_the_nearest(capsys):
    expect_user_error(["train", "--config", "tiny-cpu", "train.lrr=0.1"], capsys, "did you mean 'train.lr'")
    expect_user_error(["train", "--config", "tiny-cpi"], capsys, "did you mean 'tiny-cpu'")


def test_missing_and_corrupt_checkpoints(trained_run, tmp_path, capsys):
    _, run, _ = trained_run
    expect_user_error(["sample", "--checkpoint", str(tmp_path / "nope")], capsys, "checkpoint not found")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    step = broken / "checkpoints" / (broken / "checkpoints" / "latest").read_text().strip()
    (step / "ema.safetensors").write_bytes(b"not a safetensors file")
    expect_user_error(["sample", "--checkpoint", str(broken)], capsys, "ema.safetensors")


def test_tokenizer_vocabulary_mismatch(trained_run, tmp_path, capsys):
    from loopdlm.data.tokenizers import CharTokenizer

    _, run, _ = trained_run
    copy = tmp_path / "mismatch"
    shutil.copytree(run, copy)
    step = copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text().strip()
    shutil.rmtree(step / "tokenizer")
    CharTokenizer.from_text("abc").save(step / "tokenizer")
    expect_user_error(["sample", "--checkpoint", str(copy)], capsys, "tokenizer has 6 ids")


def test_prompt_longer_than_context_and_bad_loop_counts(trained_run, capsys):
    _, run, _ = trained_run
    expect_user_error(["sample", "--checkpoint", str(run), "--prompt", "line " * 20], capsys, "no room")
    expect_user_error(["sample", "--checkpoint", str(run), "--length", "64"], capsys, "training context")
    expect_user_error(["sample", "--checkpoint", str(run), "--loops", "0"], capsys, "--loops: must be >= 1")
    expect_user_error(["eval", "--checkpoint", str(run), "--loops", "0"], capsys, ">= 1")


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_user_error(["prepare", f"text:{empty}", "--cache-dir", str(tmp_path / "c")], capsys, "empty")


def test_module_entry_point_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loopdlm", "sample", "--checkpoint", str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "checkpoint not found" in result.stderr


def test_block_diffusion_run_generates_past_its_context(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"row {i}: to be or not to be, that is the question {i % 5}" for i in range(300)))
    run = tmp_path / "bd3"
    overrides = TINY + [f"data.source=text:{corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={run}",
                        "diffusion.block_size=8"]
    assert main(["train", "--config", "bd3-tiny-cpu", *overrides]) == 0
    capsys.readouterr()
    code, out, _ = run_cli(["sample", "--checkpoint", str(run), "--prompt", "row 1", "--length", "80",
                            "--steps", "80", "--loops", "2", "--json"], capsys)
    assert code == 0
    payload = json.loads(out)
    samples = payload["samples"]
    assert len(samples) == 2 and all(s.startswith("row 1") for s in samples)
    assert payload["new_tokens"] == 80 and all(len(s) <= len("row 1") + 80 for s in samples)
    code, out, _ = run_cli(["eval", "--checkpoint", str(run), "--loops", "2", "--batches", "1", "--batch-size", "2",
                            "--json"], capsys)
    assert code == 0 and json.loads(out)[0]["nats_per_token"] > 0
    # The viewer replays block after block.
    code, _, err = run_cli(["sample", "--checkpoint", str(run), "--prompt", "row 1", "--length", "24", "--steps", "12",
                            "--html", str(tmp_path / "bd.html"), "--trace", str(tmp_path / "bd.json")], capsys)
    assert code == 0, err
    document = embedded_document((tmp_path / "bd.html").read_text(encoding="utf-8"))
    assert document == json.loads((tmp_path / "bd.json").read_text(encoding="utf-8"))
    assert [s["append"] for s in document["steps"] if s["append"]] == [8] * (len({s["block"] for s in
                                                                               document["steps"]}) - 1)


def test_sample_writes_the_viewer_and_trace_after_printing_samples(trained_run, tmp_path, capsys):
    _, run, _ = trained_run
    page, trace = tmp_path / "view.html", tmp_path / "trace.json"
    code, out, err = run_cli(["sample", "--checkpoint", str(run), "--prompt", "line 3", "--steps", "6",
                              "--sampler", "wino", "--html", str(page), "--trace", str(trace)], capsys)
    assert code == 0, err
    document = embedded_document(page.read_text(encoding="utf-8"))
    assert document == json.loads(trace.read_text(encoding="utf-8"))
    printed = [chunk.split("\n", 1)[1][:-1] for chunk in out.split("--- sample ")[1:]]
    assert document["meta"]["samples"] == printed and len(printed) == 2
    code, out, err = run_cli(["sample", "--checkpoint", str(run), "--prompt", "line 3", "--steps", "6",
                              "--html", str(tmp_path / "missing" / "view.html")], capsys)
    assert code == 2 and "--- sample 1" in out
    assert err.count("\n") == 1 and "folder" in err and "does not exist" in err


def test_train_codd_then_sample_with_coupling(trained_run, tmp_path, capsys):
    _, run, _ = trained_run
    layer = tmp_path / "codd"
    assert main(["train-codd", "--checkpoint", str(run), "--out", str(layer), "--states", "4", "--window", "8",
                 "--steps", "2", "--batch-size", "4", "--pool-batches", "1", "--device", "cpu"]) == 0
    capsys.readouterr()
    for extra in ([], ["--codd-any-order"]):
        code, out, _ = run_cli(["sample", "--checkpoint", str(run), "--prompt", "line 2", "--num-samples", "2",
                                "--steps", "4", "--loops", "2", "--codd", str(layer), "--codd-gamma", "1.5",
                                "--json", "--html", str(tmp_path / "codd.html"), *extra], capsys)
        assert code == 0
        assert embedded_document((tmp_path / "codd.html").read_text(encoding="utf-8"))["meta"]["codd"] == str(layer)
        assert all(s.startswith("line 2") for s in json.loads(out)["samples"])
    expect_user_error(["sample", "--checkpoint", str(run), "--codd", str(tmp_path / "nope")], capsys, "nope")


def test_eval_defaults_agree_with_the_final_validation_of_training(trained_run, capsys):
    _, run, _ = trained_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = {r["loops"]: r for r in records if r["split"] == "val" and r["step"] == 4}
    code, out, _ = run_cli(["eval", "--checkpoint", str(run), "--json"], capsys)
    assert code == 0
    reports = json.loads(out)
    assert [r["loops"] for r in reports] == sorted(final)
    for report in reports:
        validation = final[report["loops"]]
        assert report["nats_per_token"] == pytest.approx(validation["nats_per_token"], rel=1e-6)
        assert report["tokens"] == validation["scored_tokens"]
        # char tokenizer: one character per token (each eos stands for one separator)
        assert report["bits_per_char"] == pytest.approx(report["bits_per_token"])
        assert validation["bits_per_char"] == pytest.approx(validation["bits_per_token"])
    code, out, _ = run_cli(["eval", "--checkpoint", str(run), "--loops", "2", "--batch-size", "2"], capsys)
    assert code == 0 and "differs from training's validation by --batch-size 2" in out and "bits/char" in out


def test_sample_length_is_new_tokens_after_the_prompt(trained_run, capsys):
    _, run, _ = trained_run
    code, out, _ = run_cli(["sample", "--checkpoint", str(run), "--prompt", "line 1", "--length", "5", "--steps", "5",
                            "--num-samples", "1", "--json"], capsys)
    payload = json.loads(out)
    assert code == 0 and payload["new_tokens"] == 5 and len(payload["samples"]) == 1
    assert payload["samples"][0].startswith("line 1") and len(payload["samples"][0]) <= len("line 1") + 5
    assert payload["sampler"]["loops"] == 3  # 0 in the config resolves to the training S_max
    code, out, _ = run_cli(["sample", "--checkpoint", str(run), "--prompt", "line 1", "--steps", "4", "--json"],
                           capsys)
    assert json.loads(out)["new_tokens"] == 32 - len("line 1")  # default: fill the context after the prompt
    expect_user_error(["sample", "--checkpoint", str(run), "--prompt", "line 1", "--length", "27"], capsys,
                      "at most 26")


def test_trace_is_written_after_the_samples_are_printed(trained_run, tmp_path, capsys):
    _, run, _ = trained_run
    expect_user_error(["sample", "--checkpoint", str(run), "--trace", str(tmp_path / "missing" / "t.json")], capsys,
                      "does not exist")
    code, out, err = run_cli(["sample", "--checkpoint", str(run), "--steps", "4", "--trace", str(tmp_path)], capsys)
    assert code == 2 and out.count("--- sample") == 2 and "the samples above are complete" in err
    trace = tmp_path / "trace.json"
    assert main(["sample", "--checkpoint", str(run), "--steps", "4", "--trace", str(trace)]) == 0
    assert len(json.loads(trace.read_text())["steps"]) == 4  # one record per step; "rows" holds the start
