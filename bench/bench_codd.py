"""CoDD benchmark: sample quality vs number of denoising steps, factorised sampler vs CoDD coupling.

Two tasks with strong dependencies between tokens committed in the same step:
  (a) alternating - 16 tokens "xyxy..." with x != y out of 4 letters (the "AB or BA" two-mode distribution with 12
      modes); quality = rows that alternate two distinct letters. (Repeated pairs "xx" would need the denoiser to
      know each position's parity, which a RoPE-only transformer has to learn by counting: too slow for a bench.)
  (b) sudoku4 - 4x4 sudoku from data/tasks.py (6 givens, unique solution) solved by infilling; quality = puzzles the
      verifier accepts.
For each task a tiny LoopMDM (4 layers, width 64, core = layers 1-2) is trained in-bench with plain AdamW on
MaskedDiffusion.nelbo (S alternating 1, 2), a CoDD prior is trained on it (train_codd_prior, top-k cache), and the
masked slots are sampled with the LLaDA low-confidence selector (S = 2) at 1, 1/2, 1/4 and 1/8 of the full number of
steps (one token per step; rounded up), factorised vs CoDD: the transform with the paper's tau = 0.1 and with
tau = 1 (the path drawn from the exact product-of-experts posterior), and the any-order variant (tau = 1); gamma =
1.01 couples every step. Recovered = (CoDD - factorised) / (factorised at full steps - factorised) at equal steps:
the share of the quality lost to parallel decoding that CoDD wins back (> 100% = better than full-step factorised).
Per-step overhead = extra wall time per denoising step with the tau = 1 transform (or the any-order variant) on, at
1/4 of the steps, from interleaved repeated timings (median).

Run: .venv/bin/python bench/bench_codd.py [--quick] [--plot docs/img/codd_quality_vs_steps.png]
One CPU thread; about 5 CPU minutes (the sudoku denoiser dominates). --quick shrinks every budget for a smoke check.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch

from loopdlm.data.task_spec import get_task
from loopdlm.data.tokenizers import CharTokenizer
from loopdlm.diffusion.masked import MaskedDiffusion
from loopdlm.diffusion.schedules import LogLinear
from loopdlm.models import LoopedTransformer, ModelConfig
from loopdlm.sampling.coupling import AnyOrderCoDDSelector, CoDDTransform
from loopdlm.sampling.predictors import FullSequencePredictor
from loopdlm.sampling.engine import generate
from loopdlm.sampling.loops import FixedLoops
from loopdlm.sampling.selectors import FixedScheduleSelector
from loopdlm.train.codd_training import CoDDTrainConfig, evaluate_codd, frozen_log_probs, train_codd_prior
from loopdlm.data.batches import TensorBatchSource

MASK = 0
LOOPS = 2
WINDOW = 16
GAMMA = 1.01
STEP_FRACTIONS = (1, 2, 4, 8)


@dataclass
class Task:
    """Rows to train on and a canvas + quality function to sample against."""

    name: str
    vocab_size: int
    train_tokens: torch.Tensor
    train_noisable: torch.Tensor
    canvas: torch.Tensor
    quality: callable
    temperature: float


def alternating_task(n_eval: int) -> Task:
    """16 tokens alternating between two distinct letters out of 4 ("xyxy..."): the "AB or BA" two-mode
    distribution with 12 modes. Every token is determined by any other one up to the choice of the partner letter."""
    letters, length = 4, 16
    generator = torch.Generator().manual_seed(0)
    two = torch.stack([torch.randperm(letters, generator=generator)[:2] for _ in range(20_000)]) + 3
    rows = two.repeat(1, length // 2)

    def quality(tokens: torch.Tensor) -> float:
        alternating = (tokens[:, 2:] == tokens[:, :-2]).all(dim=1) & (tokens[:, 0] != tokens[:, 1])
        return alternating.float().mean().item()

    return Task("alternating", 3 + letters, rows, torch.ones_like(rows, dtype=torch.bool),
                torch.full((n_eval, length), MASK), quality, temperature=1.0)


def sudoku_task(n_eval: int) -> Task:
    """4x4 sudoku as infilling: the denoiser is trained on solved grids (every cell noisable) and completes held-out
    puzzles (6 givens, unique solution) whose blanks are masked in place. Only 288 valid grids exist, so the training
    grids cover them all; what is tested is finding the one grid that fits unseen givens."""
    task = get_task("sudoku4")
    tokenizer = CharTokenizer(task.alphabet())
    grids = torch.tensor([tokenizer.encode(e.answer) for e in task.generate(3000, seed=0)])
    held_out = task.generate(n_eval, seed=1)
    canvas = torch.tensor([tokenizer.encode(e.prompt) for e in held_out])
    canvas[canvas == tokenizer.encode("0")[0]] = tokenizer.mask_id

    def quality(tokens: torch.Tensor) -> float:
        return sum(task.verify(e.prompt, tokenizer.decode(row.tolist())) for e, row in zip(held_out, tokens)) / n_eval

    return Task("sudoku4", tokenizer.vocab_size, grids, torch.ones_like(grids, dtype=torch.bool), canvas, quality,
                temperature=0.0)


def train_denoiser(task: Task, steps: int, seed: int = 0) -> tuple[LoopedTransformer, float]:
    """A tiny LoopMDM trained with AdamW (lr 2e-3, batch 64) on the MDLM NELBO; returns it and the seconds taken."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=task.vocab_size, n_layers=4, d_model=64, n_heads=4, core_start=1, core_end=3,
                         max_loops=LOOPS)
    model = LoopedTransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    objective = MaskedDiffusion(MASK, LogLinear())
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        rows = torch.randint(len(task.train_tokens), (64,), generator=generator)
        loops = 1 + step % LOOPS
        terms = objective.nelbo(lambda x, s=loops: model(x, loops=s).logits, task.train_tokens[rows], generator,
                                task.train_noisable[rows])
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
    return model.eval(), time.perf_counter() - start


#: column label -> (tau, any_order); None = the factorised sampler.
MODES = {"factorised": None, "CoDD tau=0.1": (0.1, False), "CoDD tau=1": (1.0, False), "any-order tau=1": (1.0, True)}


def run_sampler(model, task: Task, steps: int, mode: str, prior=None) -> tuple[torch.Tensor, float]:
    """Tokens and wall time of one decode of the task canvas with the sampler MODES[mode]."""
    selector, transforms = FixedScheduleSelector(steps), ()
    if MODES[mode] is not None:
        tau, any_order = MODES[mode]
        if any_order:
            selector = AnyOrderCoDDSelector(selector, prior, tau, GAMMA, WINDOW, sampling_temperature=task.temperature)
        else:
            transforms = (CoDDTransform(prior, tau, GAMMA, WINDOW),)
    denoiser = FullSequencePredictor(model, MASK, FixedLoops(LOOPS))
    result = generate(denoiser, task.canvas, selector, MASK, temperature=task.temperature, transforms=transforms,
                      generator=torch.Generator().manual_seed(0))
    return result.tokens, result.stats.wall_time


def per_step_overhead(model, task: Task, prior, steps: int, repeats: int) -> tuple[float, float, float]:
    """(median factorised ms per step, median relative overhead of the tau = 1 transform, and of the any-order
    variant), from interleaved timings so that load changes hit every sampler alike."""
    times = {mode: [] for mode in ("factorised", "CoDD tau=1", "any-order tau=1")}
    for _ in range(repeats):
        for mode, samples in times.items():
            samples.append(run_sampler(model, task, steps, mode, prior)[1] / steps)
    base = statistics.median(times["factorised"])
    return (1000 * base, statistics.median(times["CoDD tau=1"]) / base - 1,
            statistics.median(times["any-order tau=1"]) / base - 1)


def bench_task(task: Task, denoiser_steps: int, prior_config: CoDDTrainConfig, repeats: int) -> dict:
    """Train the denoiser and the prior, then measure quality per (step fraction, mode) and the overhead."""
    model, denoiser_seconds = train_denoiser(task, denoiser_steps)
    source = TensorBatchSource(task.train_tokens, task.train_noisable, batch_size=64, seed=1)
    objective = MaskedDiffusion(MASK, LogLinear())
    denoise = frozen_log_probs(model, MASK, LOOPS)
    trained = train_codd_prior(denoise, source, objective, task.vocab_size, prior_config)
    prior = trained.prior.requires_grad_(False)
    held_out = TensorBatchSource(task.train_tokens[-1024:], task.train_noisable[-1024:], batch_size=128, seed=2)
    objectives = evaluate_codd(prior, denoise, held_out, objective, prior_config.window, batches=4)
    full = int((task.canvas == MASK).sum(dim=1).max())
    steps = {fraction: math.ceil(full / fraction) for fraction in STEP_FRACTIONS}
    quality = {(fraction, mode): task.quality(run_sampler(model, task, steps[fraction], mode, prior)[0])
               for fraction in STEP_FRACTIONS for mode in MODES}
    ms_per_step, overhead, any_order_overhead = per_step_overhead(model, task, prior, steps[4], repeats)
    return {"task": task, "denoiser_seconds": denoiser_seconds, "prior_seconds": trained.seconds,
            "prior_parameters": sum(p.numel() for p in prior.parameters()), "objectives": objectives,
            "quality": quality, "steps": steps, "ms_per_step": ms_per_step, "overhead": overhead,
            "any_order_overhead": any_order_overhead,
            "n_states": prior_config.n_states}


def print_table(results: list[dict]) -> None:
    coupled_modes = [mode for mode in MODES if MODES[mode] is not None]
    print("| task | steps | " + " | ".join(MODES) + " | recovered: " + " / ".join(coupled_modes) + " |")
    print("|---" * (len(MODES) + 3) + "|")
    for r in results:
        q = r["quality"]
        top = q[(1, "factorised")]
        for fraction in STEP_FRACTIONS:
            base = q[(fraction, "factorised")]
            lost = top - base
            recovered = " / ".join(f"{(q[(fraction, m)] - base) / lost:.0%}" if lost > 0.02 else "-"
                                   for m in coupled_modes)
            cells = " | ".join(f"{q[(fraction, m)]:.3f}" for m in MODES)
            print(f"| {r['task'].name} | {r['steps'][fraction]} (1/{fraction}) | {cells} | {recovered} |")
    print()
    print("| task | denoiser train (s) | HMM states | HMM parameters | HMM train (s) | objective factorised -> "
          "coupled (nats/token) | factorised ms/step | per-step overhead: CoDD / any-order |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        o = r["objectives"]
        print(f"| {r['task'].name} | {r['denoiser_seconds']:.0f} | {r['n_states']} | {r['prior_parameters']} | "
              f"{r['prior_seconds']:.1f} | {o['factorised']:.3f} -> {o['coupled']:.3f} | {r['ms_per_step']:.1f} | "
              f"{r['overhead']:+.0%} / {r['any_order_overhead']:+.0%} |")


def plot(results: list[dict], path: str) -> None:
    """Quality vs steps, one panel per task (matplotlib is needed only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for axis, r in zip(axes[0], results):
        steps = [r["steps"][f] for f in STEP_FRACTIONS]
        for mode in MODES:
            axis.plot(steps, [r["quality"][(f, mode)] for f in STEP_FRACTIONS], marker="o", label=mode)
        axis.set_xscale("log", base=2)
        axis.set_xticks(steps, [str(s) for s in steps])
        axis.set_xlabel("denoising steps")
        axis.set_ylabel("alternating rows" if r["task"].name == "alternating" else "puzzles solved")
        axis.set_title(r["task"].name)
        axis.set_ylim(0, 1.02)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke check, not a measurement")
    parser.add_argument("--plot", default=None, help="write a PNG of quality vs steps here (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = 10 if args.quick else 1
    n_eval = 32 if args.quick else 256
    start, cpu_start = time.perf_counter(), time.process_time()
    results = [
        bench_task(alternating_task(n_eval), 600 // scale,
                   CoDDTrainConfig(n_states=32, window=WINDOW, steps=300 // scale, lr=0.1, topk=4, pool_batches=16),
                   repeats=5 // (scale // 5 + 1)),
        bench_task(sudoku_task(n_eval), 3000 // scale,
                   CoDDTrainConfig(n_states=128, window=WINDOW, steps=600 // scale, lr=0.1, topk=4, pool_batches=16),
                   repeats=5 // (scale // 5 + 1)),
    ]
    print_table(results)
    print(f"\n(wall {time.perf_counter() - start:.0f} s, CPU {time.process_time() - cpu_start:.0f} s, "
          f"torch {torch.__version__}, 1 thread)")
    if args.plot:
        plot(results, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
