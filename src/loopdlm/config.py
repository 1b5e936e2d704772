"""Run configuration: nested dataclasses, YAML presets/files, and 'section.key=value' overrides."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from loopdlm.diffusion.masked import DiffusionConfig
from loopdlm.errors import UserError
from loopdlm.models.transformer import ModelConfig
from loopdlm.sampling import SamplerSpec


@dataclass
class DataConfig:
    """Where training text comes from and how it is tokenised."""

    source: str = "shakespeare"
    tokenizer: str = "char"
    vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.05
    cache_dir: str = "data_cache"


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-4
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    eval_every: int = 250
    eval_batches: int = 8
    eval_samples: int = 1
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    distributed: str = "ddp"
    out_dir: str = "runs/default"
    init_from: str = ""
    threads: int = field(default=0, metadata={"help": "torch CPU threads per process; 0 = OMP_NUM_THREADS when set, "
                                                      "else the cores not already busy (cores minus the 1-minute "
                                                      "load average, at least 1)"})
    loop_distribution: str = field(default="uniform", metadata={
        "help": "training loop count S per update: uniform (U{1..max_loops}), poisson_lognormal (Huginn's, "
                "same mean, capped at max_loops) or curriculum (uniform up to a cap growing from 1 to max_loops)"})
    loop_curriculum_steps: int = field(default=0, metadata={
        "help": "updates over which the curriculum cap grows linearly from 1 to model.max_loops"})
    clip_core_separately: bool = field(default=False, metadata={
        "help": "clip the looped core's gradient on its own norm (and the other parameters on theirs), so "
                "large-S steps, where the shared core's gradient is largest, do not shrink everyone's update"})


@dataclass
class SampleConfig(SamplerSpec):
    """The default sampler of a run (every `SamplerSpec` field) plus how many samples to draw and the loop
    counts at which validation reports the NELBO."""

    num_samples: int = 2
    length: int = 0
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8])


@dataclass
class RunConfig:
    """Everything a run needs; saved as JSON beside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a nested dict, rejecting unknown sections or keys with a suggestion."""
        config = cls()
        for section, entries in (values or {}).items():
            target = _section(config, section)
            if not isinstance(entries, dict):
                raise UserError(f"config section '{section}' must be a mapping, got {type(entries).__name__}")
            for key, value in entries.items():
                _assign(target, section, key, value)
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
        text = path.read_text()
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
    config = RunConfig.from_dict(values)
    apply_overrides(config, overrides)
    return config


def apply_overrides(config: RunConfig, overrides: list[str]) -> None:
    """Apply 'section.key=value' strings in place; values are parsed as YAML scalars/lists."""
    for item in overrides:
        name, sep, raw = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot:
            raise UserError(f"override '{item}' must look like section.key=value (e.g. train.lr=1e-3)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _assign(_section(config, section), section, key, value)


def _section(config: RunConfig, section: str) -> Any:
    names = [f.name for f in dataclasses.fields(config)]
    if section not in names:
        raise UserError(f"unknown config section '{section}'{_suggest(section, names)}")
    return getattr(config, section)


def _assign(target: Any, section: str, key: str, value: Any) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise UserError(f"unknown config key '{section}.{key}'{_suggest(key, list(fields), section + '.')}")
    current = getattr(target, key)
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
