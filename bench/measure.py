"""Shared by the benchmarks: a clock that suits the device, training throughput through the real `Trainer`, and
the peak memory of one step."""

from __future__ import annotations

import contextlib
import json
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from loopdlm.config import RunConfig
from loopdlm.data.batches import TensorBatchSource
from loopdlm.models.transformer import ModelConfig
from loopdlm.train.trainer import Trainer
from loopdlm.workflow import build_run

T = TypeVar("T")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels (a no-op on CPU), so that a clock read afterwards includes them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(function: Callable[[], T], device: torch.device | str) -> tuple[T, float]:
    """(function(), seconds). CUDA: wall time between synchronisations. CPU: process CPU time, which a shared,
    oversubscribed machine disturbs far less than wall time (the CPU benchmarks run one thread)."""
    cuda = torch.device(device).type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    synchronize(device)
    start = clock()
    result = function()
    synchronize(device)
    return result, clock() - start


@contextlib.contextmanager
def benchmark_trainer(fields: dict, seq_len: int, batch: int, steps: int, device: str, precision: str, vocab: int,
                      compile: bool, log_every: int) -> Iterator[tuple[Trainer, Path]]:
    """A real `Trainer` (AdamW, EMA, S drawn per step, MDLM objective) on random tokens, set to run `steps` updates
    without evaluations or checkpoints, in a temporary run folder: yields (trainer, run folder)."""
    config = RunConfig()
    config.model = ModelConfig(vocab_size=vocab, **fields)
    t = config.train
    t.steps, t.batch_size, t.warmup_steps, t.eval_every, t.ckpt_every = steps, batch, 1, 10**9, 10**9
    t.log_every, t.device, t.precision, t.ema_decay, t.compile = log_every, device, precision, 0.999, compile
    t.threads = torch.get_num_threads()  # keep the thread count the benchmark chose
    tokens = torch.randint(3, vocab - 1, (batch * 4, seq_len))  # the last id is the mask
    with tempfile.TemporaryDirectory() as out:
        config.train.out_dir = out
        run = build_run(config, sources=(TensorBatchSource(tokens, None, batch, seed=0), None), vocab_size=vocab,
                        resume=False)
        yield run.trainer, Path(out)


def trainer_throughput(fields: dict, seq_len: int, batch: int, steps: int, device: str, precision: str,
                       vocab: int = 96, compile: bool = False, warmup: int = 2) -> dict[str, float]:
    """Train `steps` steps of the real Trainer loop (AdamW, EMA, S drawn per step, random tokens, MDLM objective)
    after `warmup` untimed steps; returns tokens/s and achieved FLOP/s (matmul FLOPs, core counted S times) of the
    timed steps."""
    with benchmark_trainer(fields, seq_len, batch, steps + warmup, device, precision, vocab, compile, 1) as (trainer,
                                                                                                           out):
        trainer.fit()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed_steps = [r for r in records if r["split"] == "train" and r["step"] > warmup]
    seconds = sum(batch * seq_len / r["tokens_per_s"] for r in timed_steps)
    flops = sum(r["flops_per_s"] * batch * seq_len / r["tokens_per_s"] for r in timed_steps)
    return {"tokens_per_s": batch * seq_len * len(timed_steps) / seconds, "flops_per_s": flops / seconds}


def trainer_cpu_throughput(fields: dict, seq_len: int, batch: int, steps: int, vocab: int = 96,
                           compile: bool = False, warmup: int = 2, precision: str = "fp32") -> dict[str, float]:
    """As `trainer_throughput` on the CPU (fp32 or bf16 autocast), per second of this process's CPU time: `warmup`
    steps, then `steps` more of the same Trainer (the schedule is stretched for the timed part, which costs nothing
    extra)."""
    with benchmark_trainer(fields, seq_len, batch, warmup, "cpu", precision, vocab, compile, 10**9) as (trainer, _):
        trainer.fit()
        flops, seen = trainer.counters.flops, trainer.counters.tokens
        trainer.config.train.steps = warmup + steps
        start = time.process_time()
        trainer.fit()
        seconds = time.process_time() - start
    counters = trainer.counters
    return {"tokens_per_s": (counters.tokens - seen) / seconds, "flops_per_s": (counters.flops - flops) / seconds}


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_memory_growth(function: Callable[[], object], device: torch.device | str) -> int:
    """Bytes by which memory peaks above its level before `function()`: on CUDA the allocator's peak, on CPU the
    resident set sampled every millisecond (meaningful in a fresh process started with glibc's MALLOC_MMAP_THRESHOLD_
    lowered, so that freed blocks leave the resident set)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base, peak, done = current_rss(), [0], threading.Event()

    def sample_rss() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    try:
        function()
    finally:
        done.set()
        sampler.join()
    return max(peak[0] - base, 0)
