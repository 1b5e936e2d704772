"""CPU training efficiency on one thread: achieved matmul FLOPs per CPU-second of a training step, against a dense
2048^3 fp32 matmul per CPU-second measured in the same process, eager and with `train.compile` (blocks compiled).

    python bench/bench_cpu_efficiency.py [--steps 8] [--models NAME ...] [--no-compile] [--precision bf16]

Process CPU time with one torch thread is what a shared, oversubscribed machine disturbs least, so this ratio can be
measured while other jobs run (wall-clock throughput cannot). Each row runs in a fresh subprocess, so compiled graphs
and allocator state never leak between rows. Steps are the real `Trainer` loop (AdamW, EMA, S drawn per step,
MDLM objective, random tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import trainer_cpu_throughput  # noqa: E402
from report import markdown_table, write_section  # noqa: E402

MODELS = {
    # name: (model fields, vocab, seq_len, batch)
    "6L d256 seq128 b32 (plain)": (dict(n_layers=6, d_model=256, n_heads=4), 96, 128, 32),
    "6L d256 seq128 b32 (core 1-2, S~U{1..4})": (dict(n_layers=6, d_model=256, n_heads=4, core_start=1, core_end=3,
                                                   max_loops=4), 96, 128, 32),
    "main job (demo preset: 4L d128, BPE 4096, core 1-2, S~U{1..4}, loop norm)": (
        dict(n_layers=4, d_model=128, n_heads=4, core_start=1, core_end=3, max_loops=4, loop_norm=True), 4096, 128, 32),
}


def matmul_flops_per_cpu_second(size: int = 2048, repeats: int = 6) -> float:
    """Best of `repeats` dense fp32 size^3 matmuls, in FLOPs per CPU-second."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * size ** 3 / best


def row(name: str, compile: bool, steps: int, precision: str) -> dict:
    """One measurement in this process (one thread): the model's FLOP/s per CPU-second and the matmul's."""
    torch.set_num_threads(1)
    fields, vocab, seq_len, batch = MODELS[name]
    start = time.process_time()
    result = trainer_cpu_throughput(fields, seq_len, batch, steps, vocab=vocab, compile=compile, precision=precision)
    matmul = matmul_flops_per_cpu_second()
    return {"model": name, "compile": compile, "flops_per_cpu_s": result["flops_per_s"],
            "tokens_per_cpu_s": result["tokens_per_s"], "matmul_flops_per_cpu_s": matmul,
            "ratio": result["flops_per_s"] / matmul, "cpu_seconds": time.process_time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="training precision (bf16 = autocast; the matmul reference stays fp32)")
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "COMPILE"), help=argparse.SUPPRESS)
    parser.add_argument("--markdown", default=None, help="write the section here (default docs/benchmarks.md)")
    args = parser.parse_args()
    if args.row:
        print(json.dumps(row(args.row[0], args.row[1] == "1", args.steps, args.precision)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    for name in args.models:
        for compile in (False,) if args.no_compile else (False, True):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--precision", args.precision,
                                  "--row", name, "1" if compile else "0"], env=env, capture_output=True, text=True,
                                 check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{name} | {'compiled' if compile else 'eager'} | {r['flops_per_cpu_s'] / 1e9:.1f} GFLOP/cpu-s | "
                  f"matmul {r['matmul_flops_per_cpu_s'] / 1e9:.1f} | ratio {r['ratio']:.2f} | "
                  f"{r['tokens_per_cpu_s']:.0f} tokens/cpu-s", flush=True)
    table = markdown_table(
        ["model", "blocks", "GFLOP per CPU-s", "2048^3 matmul GFLOP per CPU-s", "ratio", "tokens per CPU-s"],
        [[r["model"], "compiled" if r["compile"] else "eager", f"{r['flops_per_cpu_s'] / 1e9:.1f}",
          f"{r['matmul_flops_per_cpu_s'] / 1e9:.1f}", f"{r['ratio']:.2f}", f"{r['tokens_per_cpu_s']:.0f}"]
         for r in rows])
    body = ("### CPU training efficiency per CPU-second (one thread)\n\n"
            f"{args.steps} timed training steps after 2 warm-up steps, {args.precision}, one thread, each row in a fresh "
            "process; "
            "ratio = the step's matmul FLOPs per CPU-second over the best of 6 dense 2048^3 matmuls per CPU-second "
            "in the same process. CPU time, not wall time: the machine was shared while this ran.\n\n" + table)
    write_section("cpu-efficiency", body, **({"path": Path(args.markdown)} if args.markdown else {}))


if __name__ == "__main__":
    main()
