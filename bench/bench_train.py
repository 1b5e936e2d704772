"""Training throughput (tokens/s, achieved FLOP/s vs dense matmul FLOP/s) and peak memory against S.

    python bench/bench_train.py [--steps 20] [--device cpu|cuda] [--skip-memory]

Throughput runs the real `Trainer` loop (random tokens, S drawn per step as in training). Memory runs one training
step per (S, checkpointing) in a fresh subprocess: on CUDA the allocator's peak, on CPU the growth of the peak
resident set size during the step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import peak_memory_growth, trainer_throughput  # noqa: E402
from report import markdown_table, write_section  # noqa: E402

from loopdlm.diffusion.masked import MaskedDiffusion  # noqa: E402
from loopdlm.models.transformer import LoopedTransformer, ModelConfig  # noqa: E402
from loopdlm.train.flops import measure_matmul_flops  # noqa: E402

VOCAB = 96
MODELS = {
    # name: (model fields, seq_len, batch[, vocabulary size; default VOCAB])
    "demo, the main job (4L d128, BPE 4096, core 1-2, S~U{1..4}, loop norm)": (
        dict(n_layers=4, d_model=128, n_heads=4, core_start=1, core_end=3, max_loops=4, loop_norm=True), 128, 32,
        4096),
    "tiny-cpu (4L d128, core 1-2, S~U{1..4})": (dict(n_layers=4, d_model=128, n_heads=4, core_start=1, core_end=3,
                                                    max_loops=4), 128, 32),
    "6L d256 seq128 (plain)": (dict(n_layers=6, d_model=256, n_heads=4), 128, 32),
    "6L d256 seq128 (core 1-2, S~U{1..4})": (dict(n_layers=6, d_model=256, n_heads=4, core_start=1, core_end=3,
                                                 max_loops=4), 128, 32),
    "loopmdm-small (12L d768 seq1024, S~U{1..12})": (dict(n_layers=12, d_model=768, n_heads=12, core_start=1,
                                                         core_end=3, max_loops=12), 1024, 8),
}


def memory_child(loops: int, checkpointing: bool, device: str) -> None:
    """One training step of a 6-layer d=256 looped model at seq 256 after a warm-up step; prints the peak memory
    growth during the step in bytes (CUDA: allocator peak; CPU: resident set sampled every millisecond)."""
    torch.manual_seed(0)
    model = LoopedTransformer(ModelConfig(vocab_size=VOCAB, n_layers=6, d_model=256, n_heads=4, core_start=1,
                                          core_end=3, max_loops=12)).to(device)
    model.checkpoint_loops = checkpointing
    x0 = torch.randint(3, VOCAB, (16, 256), device=device)
    objective = MaskedDiffusion(0)

    def step(s: int) -> None:
        objective.nelbo(lambda x: model(x, loops=s).logits, x0, torch.Generator(device=device)).loss.backward()
        model.zero_grad(set_to_none=False)

    step(1)  # allocate gradients and warm the allocator so only activations grow below
    print(peak_memory_growth(lambda: step(loops), device))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=None, help="substrings of model names to run")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("LOOPS", "CHECKPOINTING"))
    args = parser.parse_args()
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1] == "1", args.device)
        return

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    precision = "bf16" if args.device == "cuda" else "fp32"
    size = 8192 if args.device == "cuda" else 2048

    def peak_matmul() -> float:
        # best of several short measurements: a momentary slowdown must not inflate the MFU fractions
        return max(measure_matmul_flops(args.device, dtype, size=size) for _ in range(3))

    matmul = peak_matmul()
    rows = []
    for name, (fields, seq_len, batch, *vocab) in MODELS.items():
        if args.models and not any(s in name for s in args.models):
            continue
        if args.device == "cpu" and fields["d_model"] > 512:
            continue  # the paper-size model is a GPU benchmark
        result = trainer_throughput(fields, seq_len, batch, args.steps, args.device, precision, *(vocab or [VOCAB]))
        rows.append([name, f"{seq_len}x{batch}", f"{result['tokens_per_s']:.0f}",
                     f"{result['flops_per_s'] / 1e9:.1f}", f"{result['flops_per_s'] / matmul:.2f}"])
        print(rows[-1], flush=True)
    matmul = max(matmul, peak_matmul())
    rows = [row[:4] + [f"{float(row[3]) * 1e9 / matmul:.2f}"] for row in rows]
    body = (f"Dense {precision} matmul measured in the same run (best of 6, before and after): {matmul / 1e9:.1f} GFLOP/s. "
            f"'MFU' = achieved training FLOP/s (matmuls incl. attention, core counted S times) / that. "
            f"{args.steps} timed steps after 2 warm-up steps of the real Trainer loop (AdamW, EMA, S drawn per step)."
            f" Targets on CPU fp32 (issue 10): >= 0.75 for 6L d256, >= 0.6 for the main job's model.\n\n"
            + markdown_table(["model", "seq x batch", "tokens/s", "GFLOP/s", "fraction of matmul"], rows))
    write_section(f"train-throughput-{args.device}", "### Training throughput\n\n" + body)

    if args.skip_memory:
        return
    mem_rows = []
    results = {}
    for checkpointing in (False, True):
        for loops in (1, 4, 12):
            # glibc keeps freed heap memory resident; serving large blocks by mmap returns them to the OS on
            # free, so the resident set follows the memory actually alive.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--memory-child", str(loops),
                                  "1" if checkpointing else "0"], capture_output=True, text=True, check=True, env=env)
            results[(checkpointing, loops)] = int(out.stdout.strip().splitlines()[-1])
        base = results[(checkpointing, 1)]
        for loops in (1, 4, 12):
            value = results[(checkpointing, loops)]
            mem_rows.append(["on" if checkpointing else "off", loops, f"{value / 2**20:.0f}", f"{value / base:.2f}"])
    ratio = results[(True, 12)] / results[(True, 1)]
    verdict = "met" if ratio <= 1.3 else "missed"
    print(mem_rows)
    body = ("One training step (forward + backward) of a 6-layer d=256 model, core = layers 1-2, batch 16 x seq 256. "
            + ("Peak CUDA allocation growth during the step, after a warm-up step." if args.device == "cuda" else
               "Growth of the resident set during the step (sampled every ms; fresh process per row, after a "
               "warm-up step at S=1, so parameters and gradients are excluded).") + "\n\n"
            + markdown_table(["per-loop checkpointing", "S", "peak MiB", "x S=1"], mem_rows)
            + f"\n\nTarget (checkpointing on, S=12 <= 1.3x S=1): {verdict} ({ratio:.2f}x).")
    write_section(f"train-memory-{args.device}", "### Peak training memory against S\n\n" + body)


if __name__ == "__main__":
    main()
