"""Run configuration: nested dataclasses, YAML presets/files, and 'section.key=value' overrides."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from loopdlm.diffusion.masked import DiffusionConfig
from loopdlm.errors import ConfigError, UserError
from loopdlm.models.transformer import ModelConfig
from loopdlm.sampling.sampler_config import SamplerConfig
from loopdlm.settings import NON_NEGATIVE, POSITIVE, PROBABILITY, Each, OneOf, Range, check_fields, setting


#: Names accepted by train.lr_schedule, train.precision and train.distributed (the last repeats
#: train/distributed.py's MODES: importing loopdlm.train here would be circular).
LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED_MODES = ("ddp", "fsdp")
#: Keys that earlier versions held elsewhere, (section, key) -> (section, key): read from old configs and
#: checkpoints and accepted as overrides. Activation checkpointing is a run-time knob, not architecture.
MOVED_KEYS = {("model", "checkpoint_loops"): ("train", "checkpoint_loops")}
#: Settings whose default changed after the setting existed, with the value a run had before it existed. Every
#: saved config holds all its fields, so a saved config without one predates it and ran with that value.
SAVED_BEFORE_DEFAULTS = {("model", "loop_norm"): False}
#: How checkpoints written before data.task existed recorded a task: data.source = "task:SPEC".
LEGACY_TASK_PREFIX = "task:"


@dataclass
class DataConfig:
    """Where training text comes from and how it is tokenised."""

    source: str = setting("shakespeare", "corpus: shakespeare | text:PATH (a text file, or a folder searched for "
                          ".txt files) | jsonl:PATH:FIELD (one document per line, its text in FIELD); unused when "
                          "data.task is set")
    task: str = setting("", "train on a task's examples instead of a corpus: a task spec as `finetune --task` takes "
                        "it (finetune records it here); '' = the corpus of data.source")
    tokenizer: str = setting("char", "char (one id per character) or bpe (byte-level BPE trained on the corpus)",
                             OneOf(("char", "bpe")))
    vocab_size: int = setting(4096, "BPE vocabulary size, special tokens included (char ignores it)", POSITIVE)
    seq_len: int = setting(128, "tokens per training sequence (the model's context)", POSITIVE)
    val_fraction: float = setting(0.05, "fraction of the token stream (its end) held out for validation",
                                  Range(0, 1, high_open=True))
    cache_dir: str = setting("data_cache", "folder for downloaded sources and prepared corpora")

    def validate(self) -> None:
        """Raise ConfigError for a value out of range."""
        check_fields(self, "data.")


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    steps: int = setting(1000, "optimizer updates in total (a resumed run continues up to this)", NON_NEGATIVE)
    batch_size: int = setting(32, "sequences per micro-batch per process", POSITIVE)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer update", POSITIVE)
    lr: float = setting(3e-4, "peak AdamW learning rate", NON_NEGATIVE)
    lr_schedule: str = setting("cosine", "after warmup: cosine decay to min_lr_ratio * lr, or constant",
                               OneOf(LR_SCHEDULES))
    min_lr_ratio: float = setting(0.1, "cosine schedule: final learning rate as a fraction of lr", PROBABILITY)
    warmup_steps: int = setting(100, "linear warmup updates", NON_NEGATIVE)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay", NON_NEGATIVE)
    beta1: float = setting(0.9, "AdamW beta1", Range(0, 1, high_open=True))
    beta2: float = setting(0.999, "AdamW beta2", Range(0, 1, high_open=True))
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = no clipping)", NON_NEGATIVE)
    ema_decay: float = setting(0.9999, "EMA of the weights used for evaluation and sampling (0 = no EMA)",
                               Range(0, 1, high_open=True))
    eval_every: int = setting(250, "validate every this many updates, and at the end (0 = only at the end)",
                              NON_NEGATIVE)
    eval_batches: int = setting(8, "validation batches per evaluation (the same ones every time)", POSITIVE)
    eval_samples: int = setting(1, "noise levels t drawn per validation batch (K)", POSITIVE)
    log_every: int = setting(10, "log training loss every this many updates (0 = only at the end)", NON_NEGATIVE)
    ckpt_every: int = setting(500, "checkpoint every this many updates, and at the end (0 = only at the end)",
                              NON_NEGATIVE)
    keep_last: int = setting(2, "checkpoints kept in the run folder (0 = keep all)", NON_NEGATIVE)
    seed: int = setting(0, "seeds initialisation, data order, noise and the loop counts S")
    device: str = setting("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    precision: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16", OneOf(PRECISIONS))
    compile: bool = setting(False, "torch.compile each transformer block")
    checkpoint_loops: bool = setting(False, "activation checkpointing per loop of the core (memory flat in S; "
                                     "formerly model.checkpoint_loops)")
    distributed: str = setting("ddp", "data parallelism under torchrun: ddp or fsdp (FSDP2)", OneOf(DISTRIBUTED_MODES))
    out_dir: str = setting("runs/default", "run folder: metrics.jsonl and checkpoints/ (resumed when it holds any)")
    init_from: str = setting("", "start from this checkpoint's weights (a run or step folder; '' = fresh)")

    threads: int = setting(0, "torch CPU threads per process; 0 = OMP_NUM_THREADS when set, else the cores not "
                           "already busy (cores minus the cores busy right now, at least 1)", NON_NEGATIVE)
    # The names repeat train/loop_counts.py's LOOP_DISTRIBUTIONS (importing the train package here is circular).
    loop_distribution: str = setting(
        "uniform", "training loop count S per update: uniform (U{1..max_loops}), poisson_lognormal (Huginn's, same "
        "mean, capped at max_loops) or curriculum (uniform up to a cap growing from 1 to max_loops)",
        OneOf(("uniform", "poisson_lognormal", "curriculum")))
    loop_curriculum_steps: int = setting(0, "updates over which the curriculum cap grows linearly from 1 to "
                                            "model.max_loops", NON_NEGATIVE)
    clip_core_separately: bool = setting(False, "clip the looped core's gradient on its own norm (and the other "
                                         "parameters on theirs), so large-S steps, where the shared core's gradient "
                                         "is largest, do not shrink everyone's update")

    def validate(self) -> None:
        """Raise ConfigError for a value out of range."""
        check_fields(self, "train.")
        if self.loop_distribution == "curriculum" and self.loop_curriculum_steps < 1:
            raise ConfigError("train.loop_distribution=curriculum needs train.loop_curriculum_steps >= 1")


@dataclass
class SampleConfig(SamplerConfig):
    """The default sampler of a run (every `SamplerConfig` field, nested: sample.wino.tau1, sample.loop.policy,
    sample.codd.prior, ...) plus how many samples to draw and the loop counts at which validation reports the NELBO.
    The flat keys of configs written before the nesting (sample.tau1, sample.loops, ...) are read into their new
    place (`SamplerConfig.FLAGS`)."""

    num_samples: int = setting(2, "samples per prompt drawn by `loopdlm sample`", POSITIVE)
    length: int = setting(0, "new tokens per sample (0 = fill the training context after the prompt)",
                          NON_NEGATIVE)
    eval_loops: list[int] = setting(help="loop counts S at which validation reports the NELBO", check=Each(POSITIVE),
                                    default_factory=lambda: [1, 2, 4, 8])

    def validate(self) -> None:
        """Raise ConfigError for a value out of range (the sampler's fields included)."""
        super().validate("sample.")


@dataclass
class RunConfig:
    """Everything a run needs; saved as JSON beside every checkpoint."""

    model: ModelConfig = setting(help="the denoiser's shape and loop structure", default_factory=ModelConfig)
    diffusion: DiffusionConfig = setting(help="the noise process", default_factory=DiffusionConfig)
    data: DataConfig = setting(help="training text and tokenizer", default_factory=DataConfig)
    train: TrainConfig = setting(help="optimisation, evaluation and checkpoints", default_factory=TrainConfig)
    sample: SampleConfig = setting(help="default sampler and sample counts", default_factory=SampleConfig)

    def validate(self) -> None:
        """Raise ConfigError (a UserError naming the key and its allowed values) for any value out of range."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a nested dict, rejecting unknown sections or keys with a suggestion. Keys that earlier
        versions kept elsewhere (`MOVED_KEYS`, and a task recorded as data.source='task:SPEC') are read into their
        current place, so old checkpoints keep loading."""
        config = cls()
        for section, entries in (values or {}).items():
            if not isinstance(entries, dict):
                raise UserError(f"config section '{section}' must be a mapping, got {type(entries).__name__}")
            for key, value in entries.items():
                if (section, key) == ("data", "source") and str(value).startswith(LEGACY_TASK_PREFIX):
                    key, value = "task", value[len(LEGACY_TASK_PREFIX):]
                _assign_key(config, section, key, value)
        return config

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> RunConfig:
        """`from_dict` for a config saved with a run (a checkpoint's): a setting it lacks predates that setting,
        so it takes the value runs had before it (`SAVED_BEFORE_DEFAULTS`), not today's default."""
        config = cls.from_dict(values)
        for (section, key), value in SAVED_BEFORE_DEFAULTS.items():
            if key not in (values or {}).get(section, {}):
                _assign_key(config, section, key, value)
        return config


def available_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files("loopdlm.presets").iterdir() if p.name.endswith(".yaml"))


def load_config(preset_or_file: str, overrides: list[str] = ()) -> RunConfig:
    """Load a shipped preset by name, or a YAML file by path, then apply 'section.key=value' overrides."""
    path = Path(preset_or_file)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file not found: {preset_or_file}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"config {preset_or_file} is not a text (UTF-8) file") from None
    elif preset_or_file in available_presets():
        text = resources.files("loopdlm.presets").joinpath(f"{preset_or_file}.yaml").read_text()
    else:
        near = difflib.get_close_matches(preset_or_file, available_presets(), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else f"; presets: {', '.join(available_presets())}"
        raise UserError(f"unknown preset or config file '{preset_or_file}'{hint}")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config {preset_or_file} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config {preset_or_file} must map sections to keys (section: {{key: value}}), "
                        f"got a {type(values).__name__} at the top level")
    config = RunConfig.from_dict(values)
    apply_overrides(config, overrides)
    config.validate()
    return config


def apply_overrides(config: RunConfig, overrides: list[str]) -> None:
    """Apply 'section.key=value' strings in place; values are parsed as YAML scalars/lists."""
    for item in overrides:
        name, sep, raw = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot:
            raise UserError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-3)")
        section, key = MOVED_KEYS.get((section, key), (section, key))
        target = _section(config, section)
        if raw.strip():
            value = _parse_value(raw)
        elif isinstance(_current_value(target, section, key), str):
            value = ""  # e.g. train.init_from= (clear it)
        else:
            raise UserError(f"override '{item}' has no value; write {name}=VALUE")
        _assign(target, section, key, value)


def _assign_key(config: RunConfig, section: str, key: str, value: Any) -> None:
    """Set config.section.key (at its current place when `MOVED_KEYS` moved it)."""
    section, key = MOVED_KEYS.get((section, key), (section, key))
    _assign(_section(config, section), section, key, value)


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _section(config: RunConfig, section: str) -> Any:
    names = [f.name for f in dataclasses.fields(config)]
    if section not in names:
        raise UserError(f"unknown config section '{section}'{_suggest(section, names)}")
    return getattr(config, section)


#: Per section, flat keys of older configs -> their dotted place now (only read when the value is not a mapping).
RENAMED_KEYS = {"sample": SamplerConfig.FLAGS}


def _current_value(target: Any, section: str, key: str) -> Any:
    """The value at (dotted, possibly renamed) `key` of the section `target` (None when there is no such key)."""
    for part in RENAMED_KEYS.get(section, {}).get(key, key).split("."):
        target = getattr(target, part, None)
    return target


def _assign(target: Any, section: str, key: str, value: Any) -> None:
    """Set `key` of the config section `target` (named `section` in messages). `key` may be dotted (wino.tau1) and a
    mapping value fills a nested group key by key."""
    if not isinstance(value, dict):
        key = RENAMED_KEYS.get(section, {}).get(key, key)
    key, dot, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise UserError(f"unknown config key '{section}.{key}'{_suggest(key, list(fields), section + '.')}")
    current = getattr(target, key)
    if dataclasses.is_dataclass(current):
        if dot:
            _assign(current, f"{section}.{key}", rest, value)
        elif isinstance(value, dict):
            for inner, inner_value in value.items():
                _assign(current, f"{section}.{key}", inner, inner_value)
        else:
            keys = ", ".join(f.name for f in dataclasses.fields(current))
            raise UserError(f"config key '{section}.{key}' is a group ({keys}); set one of them, e.g. "
                            f"{section}.{key}.{dataclasses.fields(current)[0].name}=VALUE")
        return
    if dot:
        raise UserError(f"unknown config key '{section}.{key}.{rest}': '{section}.{key}' has no keys below it")
    if isinstance(value, bool) != isinstance(current, bool) and isinstance(current, (bool, int, float)):
        # bool is an int in Python; 'train.steps=true' must not become 1 step, nor 'compile=1' a flag.
        raise UserError(f"config key '{section}.{key}' expects {type(current).__name__}, got {value!r}")
    if value is not None and current is not None and not isinstance(value, type(current)):
        if isinstance(current, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            value = _to_number(value, float, section, key)
        elif isinstance(current, int) and not isinstance(current, bool) and isinstance(value, str):
            value = _to_number(value, int, section, key)
        elif isinstance(current, str):
            value = str(value)
        else:
            raise UserError(f"config key '{section}.{key}' expects {type(current).__name__}, got {value!r}")
    setattr(target, key, value)


def _to_number(value: Any, kind: type, section: str, key: str) -> Any:
    # YAML 1.1 reads '1e-3' as a string, so numbers are converted here.
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"config key '{section}.{key}' expects {kind.__name__}, got {value!r}") from None


def _suggest(word: str, options: list[str], prefix: str = "") -> str:
    near = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean '{prefix}{near[0]}'?" if near else ""
