"""Training throughput (tokens/s, achieved FLOP/s vs dense matmul FLOP/s) and peak memory against S.

    python bench/bench_train.py [--steps 20] [--device cpu|cuda] [--skip-memory]

Throughput runs the real `Trainer` loop (random tokens, S drawn per step as in training). Memory runs one training
step per (S, checkpointing) in a fresh subprocess: on CUDA the allocator's peak, on CPU the growth of the peak
resident set size during the step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, write_section  # noqa: E402

from loopdlm.config import RunConfig  # noqa: E402
from loopdlm.diffusion.masked import MaskedDiffusion  # noqa: E402
from loopdlm.models.transformer import LoopedTransformer, ModelConfig  # noqa: E402
from loopdlm.train.flops import measure_matmul_flops  # noqa: E402
from loopdlm.train.trainer import TensorBatchSource, Trainer  # noqa: E402

VOCAB = 96
MODELS = {
    # name: (model fields, seq_len, batch)
    "tiny-cpu (4L d128, core 1-2, S~U{1..4})": (dict(n_layers=4, d_model=128, n_heads=4, core_start=1, core_end=3,
                                                    max_loops=4), 128, 32),
    "6L d256 seq128 (plain)": (dict(n_layers=6, d_model=256, n_heads=4), 128, 32),
    "6L d256 seq128 (core 1-2, S~U{1..4})": (dict(n_layers=6, d_model=256, n_heads=4, core_start=1, core_end=3,
                                                 max_loops=4), 128, 32),
    "loopmdm-small (12L d768 seq1024, S~U{1..12})": (dict(n_layers=12, d_model=768, n_heads=12, core_start=1,
                                                         core_end=3, max_loops=12), 1024, 8),
}


def throughput(fields: dict, seq_len: int, batch: int, steps: int, device: str, precision: str) -> dict:
    """Train `steps` steps after 2 warm-up steps; returns tokens/s and achieved FLOP/s of the timed steps."""
    config = RunConfig()
    config.model = ModelConfig(vocab_size=VOCAB, **fields)
    t = config.train
    t.steps, t.batch_size, t.warmup_steps, t.eval_every, t.ckpt_every = steps + 2, batch, 1, 10**9, 10**9
    t.log_every, t.device, t.precision, t.ema_decay = 1, device, precision, 0.999
    tokens = torch.randint(3, VOCAB, (batch * 4, seq_len))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, LoopedTransformer(config.model), MaskedDiffusion(0),
                          TensorBatchSource(tokens, None, batch, seed=0), None, out, resume=False)
        trainer.fit()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["split"] == "train" and r["step"] > 2]
    seconds = sum(batch * seq_len / r["tokens_per_s"] for r in timed)
    flops = sum(r["flops_per_s"] * batch * seq_len / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": batch * seq_len * len(timed) / seconds, "flops_per_s": flops / seconds}


def memory_child(loops: int, checkpointing: bool, device: str) -> None:
    """One training step of a 6-layer d=256 looped model at seq 256; prints the peak memory growth in bytes."""
    torch.manual_seed(0)
    model = LoopedTransformer(ModelConfig(vocab_size=VOCAB, n_layers=6, d_model=256, n_heads=4, core_start=1,
                                          core_end=3, max_loops=12, checkpoint_loops=checkpointing)).to(device)
    x0 = torch.randint(3, VOCAB, (16, 256), device=device)
    objective = MaskedDiffusion(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    terms = objective.nelbo(lambda x: model(x, loops=loops).logits, x0, torch.Generator(device=device))
    terms.loss.backward()
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(peak - base)


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
    matmul = measure_matmul_flops(args.device, dtype, size=8192 if args.device == "cuda" else 2048)
    rows = []
    for name, (fields, seq_len, batch) in MODELS.items():
        if args.models and not any(s in name for s in args.models):
            continue
        if args.device == "cpu" and fields["d_model"] > 512:
            continue  # the paper-size model is a GPU benchmark
        result = throughput(fields, seq_len, batch, args.steps, args.device, precision)
        rows.append([name, f"{seq_len}x{batch}", f"{result['tokens_per_s']:.0f}",
                     f"{result['flops_per_s'] / 1e9:.1f}", f"{result['flops_per_s'] / matmul:.2f}"])
        print(rows[-1], flush=True)
    body = (f"Dense {precision} matmul measured in the same run: {matmul / 1e9:.1f} GFLOP/s. "
            f"'MFU' = achieved training FLOP/s (matmuls incl. attention, core counted S times) / that.\n\n"
            + markdown_table(["model", "seq x batch", "tokens/s", "GFLOP/s", "fraction of matmul"], rows))
    write_section(f"train-throughput-{args.device}", "### Training throughput\n\n" + body)

    if args.skip_memory:
        return
    mem_rows = []
    results = {}
    for checkpointing in (False, True):
        for loops in (1, 4, 12):
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--memory-child", str(loops),
                                  "1" if checkpointing else "0"], capture_output=True, text=True, check=True)
            results[(checkpointing, loops)] = int(out.stdout.strip().splitlines()[-1])
        base = results[(checkpointing, 1)]
        for loops in (1, 4, 12):
            value = results[(checkpointing, loops)]
            mem_rows.append(["on" if checkpointing else "off", loops, f"{value / 2**20:.0f}", f"{value / base:.2f}"])
    print(mem_rows)
    body = ("One training step (forward + backward) of a 6-layer d=256 model, core = layers 1-2, batch 16 x seq 256. "
            + ("Peak CUDA allocation growth." if args.device == "cuda" else
               "Growth of peak resident memory during the step (fresh process per row).") + "\n\n"
            + markdown_table(["per-loop checkpointing", "S", "peak MiB", "x S=1"], mem_rows))
    write_section(f"train-memory-{args.device}", "### Peak training memory against S\n\n" + body)


if __name__ == "__main__":
    main()
