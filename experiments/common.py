"""Shared pieces of the CPU reproduction study: model variants, FLOPs matching, parallel single-thread jobs,
metrics reading and seed statistics.

Every training job runs in its own process with one intra-op thread: on a small shared CPU, two single-threaded
jobs side by side finish far sooner than one two-threaded job after another (tiny matmuls do not scale).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "loopdlm"]
RESULTS = REPO / "experiments" / "results"
IMAGES = REPO / "docs" / "img"

#: Model overrides of each variant: the same 4-layer d=128 stack, looped or not, and the FLOPs-matched deeper MDM.
#: The plain models pin per-loop supervision off, which is a no-op without a core, so their saved configs say so.
LOOP = ["model.n_layers=4", "model.core_start=1", "model.core_end=3", "model.max_loops=4"]
MDM = ["model.n_layers=4", "model.core_start=0", "model.core_end=0", "model.max_loops=1",
       "diffusion.loop_supervision=0.0"]
DEEP = ["model.n_layers=7", "model.core_start=0", "model.core_end=0", "model.max_loops=1",
        "diffusion.loop_supervision=0.0"]


def flops_per_token(seq_len: int, n_layers: int = 4, core: tuple[int, int] = (0, 0), loops: float = 1.0,
                    d_model: int = 128, vocab: int = 90) -> float:
    """Training FLOPs per token from the model's own formula (the one the trainer logs)."""
    from loopdlm.models.transformer import LoopedTransformer, ModelConfig

    cfg = ModelConfig(vocab_size=vocab, n_layers=n_layers, d_model=d_model, n_heads=4, core_start=core[0],
                      core_end=core[1], max_loops=max(1, int(loops)))
    return LoopedTransformer(cfg).flops_per_token(seq_len, loops)


def loop_step_cost_ratio(seq_len: int, vocab: int = 90, max_loops: int = 4) -> float:
    """Expected training FLOPs per step of the 4-layer LoopMDM (core = layers 1-2, S ~ U{1..S_max}) over the
    same-size MDM's."""
    expected = (max_loops + 1) / 2
    return flops_per_token(seq_len, 4, (1, 3), expected, vocab=vocab) / flops_per_token(seq_len, 4, vocab=vocab)


def run_jobs(commands: Sequence[Sequence[str]], logs: Sequence[Path], parallel: int = 2) -> None:
    """Run CLI commands, `parallel` at a time, each single-threaded; raise if any fails (its log says why)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(job: tuple[Sequence[str], Path]) -> None:
        command, log = job
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w", encoding="utf-8") as handle:
            handle.write(" ".join(command) + "\n")
            handle.flush()
            code = subprocess.call(list(command), stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if code != 0:
            raise RuntimeError(f"job failed ({code}); see {log}")

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, zip(commands, logs)))


def trained_to(run_dir: Path, steps: int) -> bool:
    """True when the run's metrics already hold training step `steps` (its evaluation may still be missing)."""
    path = Path(run_dir) / "metrics.jsonl"
    return path.is_file() and any(r.get("split") == "train" and r.get("step") == steps for r in read_metrics(run_dir))


def training_command(task: str | None, preset: str, run_dir: Path, settings: Sequence[str]) -> list[str]:
    """The command that trains (or resumes) one study run: `loopdlm finetune` on a generated task, or, for
    character-level text (task None), experiments/train_lm.py, which scores every run on the same validation text
    whatever its seed."""
    if task is None:
        return [CLI[0], str(REPO / "experiments" / "train_lm.py"), preset, str(run_dir), *settings]
    return [*CLI, "finetune", "--task", task, "--config", preset, *settings, f"train.out_dir={run_dir}"]


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def val_curve(run_dir: Path, loops: int) -> tuple[list[float], list[float]]:
    """(cumulative training FLOPs, validation NELBO nats/token) at each evaluation with S = `loops`."""
    rows = [r for r in read_metrics(run_dir) if r["split"] == "val" and r["loops"] == loops]
    return [r["flops"] for r in rows], [r["nats_per_token"] for r in rows]


def first_crossing(flops: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """FLOPs at which a decreasing curve first reaches `target` (linear interpolation between evaluations), or None
    when it never does."""
    for i, value in enumerate(values):
        if value <= target:
            if i == 0:
                return flops[0]
            f0, f1, v0, v1 = flops[i - 1], flops[i], values[i - 1], values[i]
            return f0 + (f1 - f0) * (v0 - target) / (v0 - v1)
    return None


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half the max - min range) over seeds; the range is the honest spread for two seeds."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (max(values) - min(values)) / 2


def save_json(name: str, payload: object) -> Path:
    """Write experiments/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def cli_json(args: Sequence[str]) -> object:
    """Run one `loopdlm` command single-threaded and parse the JSON it prints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"loopdlm {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)
