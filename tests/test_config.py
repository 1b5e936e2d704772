"""Config and command-line boundaries: every field documented, every out-of-range value and malformed config file
refused with one line (exit code 2) that names the allowed values, and --help showing every default."""

import argparse
import dataclasses

import pytest

from loopdlm.cli import build_parser, main
from loopdlm.config import RunConfig, load_config
from loopdlm.errors import UserError
from loopdlm.sampling import SamplerConfig
from loopdlm.settings import HELP


def one_line_error(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_every_config_field_has_a_documented_default():
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        assert section.metadata.get(HELP), section.name
        for spec in dataclasses.fields(getattr(defaults, section.name)):
            assert spec.metadata.get(HELP, "").strip(), f"{section.name}.{spec.name} has no help"
            assert spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING


def test_config_list_prints_every_key_with_its_default(capsys):
    assert main(["config", "--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    def keys(prefix, values):  # nested groups (sample.wino, ...) are listed key by key
        for spec in dataclasses.fields(values):
            value = getattr(values, spec.name)
            yield from keys(f"{prefix}.{spec.name}", value) if dataclasses.is_dataclass(value) else [
                f"{prefix}.{spec.name}"]

    for key in keys("run", RunConfig()):
        assert key.removeprefix("run.") in lines
    assert lines["sample.wino.tau1"].split()[1:3] == ["float", "0.6"]
    assert lines["train.beta1"].split()[1:3] == ["float", "0.9"] and "[in [0, 1)]" in lines["train.beta1"]
    assert main(["config", "--show", "tiny-cpu", "train.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("train.steps=", "has no value"),
    ("train.steps=true", "expects int"),
    ("model.compile=1", "unknown config key"),
    ("train.compile=1", "expects bool"),
    ("model.n_heads=0", "model.n_heads must be >= 1, got 0"),
    ("model.n_heads=-2", "model.n_heads must be >= 1"),
    ("model.d_model=0", "model.d_model must be >= 1"),
    ("model.d_model=100", "must be an even integer"),
    ("model.core_end=9", "core_end <= model.n_layers"),
    ("train.lr=-1e-3", "train.lr must be >= 0"),
    ("train.beta1=1", "train.beta1 must be in [0, 1)"),
    ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1)"),
    ("train.precision=fp16", "one of auto, fp32, bf16"),
    ("diffusion.eps=2", "diffusion.eps must be in [0, 1)"),
    ("diffusion.eps=-0.1", "diffusion.eps must be in [0, 1)"),
    ("diffusion.block_size=0", "diffusion.block_size must be >= 1"),
    ("diffusion.clip_high=0", "clip_low < diffusion.clip_high"),
    ("data.seq_len=0", "data.seq_len must be >= 1"),
    ("sample.top_p=0", "sample.top_p must be in (0, 1]"),
    ("sample.sampler=greedy", "sample.sampler must be one of"),
    ("sample.eval_loops=[0]", "sample.eval_loops must be a non-empty list of integers >= 1"),
    ("sample.num_samples=0", "sample.num_samples must be >= 1"),
])
def test_out_of_range_config_values_are_refused_with_the_allowed_range(override, message, capsys, tmp_path):
    error = one_line_error(["train", "--config", "tiny-cpu", override, f"train.out_dir={tmp_path}"], capsys)
    assert message in error
    assert not any(tmp_path.iterdir())  # refused before anything was prepared or written


def test_clearing_a_text_key_with_an_empty_value_is_allowed():
    assert load_config("tiny-cpu", ["train.init_from="]).train.init_from == ""
    assert load_config("tiny-cpu", ["diffusion.block_size=null"]).diffusion.block_size is None


@pytest.mark.parametrize("content, message", [
    (b"- model\n- train\n", "got a list at the top level"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not a text (UTF-8) file"),
    (b"train:\n  steps:\n", "train.steps needs a value"),
    (b"train: [1, 2]\n", "must be a mapping"),
])
def test_malformed_config_files_give_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert message in one_line_error(["train", "--config", str(path)], capsys)
    with pytest.raises(UserError) as error:
        load_config(str(path))
    assert message in str(error.value)


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "--top-p: must be in (0, 1], got 0"),
    (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["--min-loops", "0"], "--min-loops: must be >= 1"),
    (["--length", "-5"], "--length: must be >= 0"),
    (["--temperature", "-1"], "--temperature: must be >= 0"),
    (["--threshold", "1.5"], "--threshold: must be in [0, 1]"),
    (["--threshold", "-0.5"], "--threshold: must be in [0, 1]"),
    (["--tau1", "2"], "--tau1: must be in [0, 1]"),
    (["--tau2", "-1"], "--tau2: must be in [0, 1]"),
    (["--loop-eps", "-1"], "--loop-eps: must be >= 0"),
    (["--block-length", "-4"], "--block-length: must be >= 0"),
    (["--num-samples", "0"], "--num-samples: must be >= 1"),
    (["--loops", "0"], "--loops: must be >= 1"),
    (["--steps", "ten"], "--steps: expects an integer"),
    (["--sampler", "greedy"], "--sampler: invalid choice"),
])
def test_out_of_range_sample_flags_are_refused_before_loading_anything(flags, message, capsys, tmp_path):
    assert message in one_line_error(["sample", "--checkpoint", str(tmp_path / "none"), *flags], capsys)


@pytest.mark.parametrize("command", ["eval", "eval-task", "genppl", "attention", "train-codd"])
def test_other_commands_refuse_out_of_range_numbers(command, capsys, tmp_path):
    flag = {"eval": "--batches", "eval-task": "--n", "genppl": "--num-samples", "attention": "--n",
            "train-codd": "--states"}[command]
    extra = ["--out", str(tmp_path / "o")] if command == "train-codd" else []
    extra += ["--judge", "j"] if command == "genppl" else []
    error = one_line_error([command, "--checkpoint", str(tmp_path), *extra, flag, "0"], capsys)
    assert f"{flag}: must be >= 1, got 0" in error


def test_sampler_spec_from_an_old_checkpoint_config_is_validated():
    with pytest.raises(UserError, match="sample.top_p must be in"):
        SamplerConfig.from_flags(top_p=0.0).validate("sample.")
    with pytest.raises(UserError, match="wino.min_accept"):
        RunConfig.from_dict({"sample": {"wino_min_accept": 30}}).validate()


def test_help_shows_every_default():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default not in (None, False):
                assert "default" in command.formatter_class(name)._get_help_string(action), \
                    f"{name} {action.option_strings[0]}: default not shown"
        assert "(default: %(default)s)" not in text
