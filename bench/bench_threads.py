"""Training step time of the tiny-cpu model against the number of torch threads, on the machine as it is (busy or
not), to choose `train.threads`' default.

    python bench/bench_threads.py [--steps 12] [--threads 1 2]

Each thread count runs in a fresh process (one torch thread pool per process): the real Trainer loop on random
tokens, 2 warm-up steps, then the median of the timed steps' seconds per step. The 1-minute load average before
each measurement says how busy the cores were.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, write_section  # noqa: E402

from loopdlm.config import load_config  # noqa: E402
from loopdlm.data.batches import TensorBatchSource  # noqa: E402
from loopdlm.workflow import build_run  # noqa: E402

VOCAB = 68  # the character vocabulary of the Shakespeare corpus, about


def child(steps: int) -> None:
    """Train the tiny-cpu model for 2 + `steps` steps with the current thread count; print the per-step seconds."""
    config = load_config("tiny-cpu", [f"train.steps={steps + 2}", "train.log_every=1", "train.eval_every=0",
                                      "train.ckpt_every=100000", "train.device=cpu"])
    config.model.vocab_size = VOCAB
    tokens = torch.randint(0, VOCAB - 1, (config.train.batch_size * 8, config.data.seq_len))
    with tempfile.TemporaryDirectory() as out:
        config.train.out_dir, config.train.threads = out, torch.get_num_threads()
        build_run(config, sources=(TensorBatchSource(tokens, None, config.train.batch_size), None),
                  vocab_size=VOCAB, resume=False).trainer.fit()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = config.train.batch_size * config.data.seq_len
    print(json.dumps([tokens_per_step / r["tokens_per_s"] for r in records if r["step"] > 2]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.steps)
        return
    rows = []
    for threads in args.threads:
        load = os.getloadavg()[0]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)], env=env,
                             capture_output=True, text=True, check=True)
        seconds = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([threads, f"{load:.2f}", f"{statistics.median(seconds) * 1e3:.0f}",
                     f"{min(seconds) * 1e3:.0f}", f"{max(seconds) * 1e3:.0f}"])
        print(rows[-1], flush=True)
    body = (f"tiny-cpu model (4L d128, core 1-2, S~U{{1..4}}, batch 16 x seq 128, fp32), {args.steps} timed steps "
            f"after 2 warm-up steps, {os.cpu_count()} cores. Load = 1-minute load average just before the run.\n\n"
            + markdown_table(["threads", "load before", "median ms/step", "min", "max"], rows))
    write_section("train-threads-cpu", "### Training step time against torch threads\n\n" + body)


if __name__ == "__main__":
    main()
