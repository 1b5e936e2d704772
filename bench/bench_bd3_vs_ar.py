"""Block diffusion against autoregression at the same size, corpus and training budget: decoding tokens/s at batch 1
and 16 (both with KV caches), generative perplexity under a separately trained judge, and sample entropy.

    python bench/bench_bd3_vs_ar.py [--steps 300] [--batch 16] [--judge-steps 600] [--runs runs/bd3-vs-ar]
                                    [--bd3-run DIR] [--ar-run DIR] [--judge-run DIR] [--threads 1] [--no-write]

Three runs on character-level Shakespeare at seq 128 (trained with the library's `train` / `train-judge` commands,
or resumed/reused from the run folders, so a rerun with the same --runs only decodes):
  * BD3: the plain 4-layer d=128 transformer (bd3-tiny-cpu without its looped core), block diffusion with L' = 16;
  * AR: the same transformer with a causal mask and next-token loss (judge-tiny), same steps, batch, lr schedule;
  * judge: another judge-tiny run with a different seed and --judge-steps updates, used only for scoring.
Each decoder continues the same 16-character validation prompts by --length characters at temperature 1: BD3
block by block with its KV cache (top-k with 16 steps per block, threshold decoding at several thresholds, WINO at
several draft thresholds), AR token by token with its KV cache (and without, for reference). tokens/s counts
generated tokens per second of process CPU time on CPU (one thread by default) or of wall time on CUDA. gen-PPL
and entropy are over the --samples continuations decoded at batch 16 (continuations only, without the prompt).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import timed  # noqa: E402
from report import markdown_table, write_section  # noqa: E402

from loopdlm.cli import main as cli_main  # noqa: E402
from loopdlm.eval.genppl import LoopedJudge, generative_perplexity  # noqa: E402
from loopdlm.diffusion.masked import DiffusionConfig  # noqa: E402
from loopdlm.sampling import SamplerConfig, build_decoder  # noqa: E402
from loopdlm.sampling.autoregressive import generate_autoregressive  # noqa: E402
from loopdlm.sampling.long_generation import generate_long  # noqa: E402
from loopdlm.train.trainer import METRICS_FILE  # noqa: E402
from loopdlm.workflow import checkpoint_corpus_split, load_pretrained, resolve_device  # noqa: E402

BLOCK = 16
PLAIN = ["model.core_start=0", "model.core_end=0", "model.max_loops=1"]


@dataclass
class Decoder:
    """One decoding setting: `model` is 'bd3' or 'ar'; BD3 settings are a SamplerConfig, AR ones use_cache."""

    name: str
    model: str
    spec: SamplerConfig | None = None
    use_cache: bool = True


def decoders(thresholds: list[float], wino_tau1: list[float]) -> list[Decoder]:
    """AR with and without its cache, then BD3 top-k (one token per step), threshold and WINO settings."""
    found = [Decoder("AR, KV cache", "ar"), Decoder("AR, no cache", "ar", use_cache=False),
             Decoder(f"BD3 top-k {BLOCK} steps/block", "bd3", SamplerConfig.from_flags(sampler="topk"))]
    found += [Decoder(f"BD3 threshold {tau}", "bd3", SamplerConfig.from_flags(sampler="threshold", threshold=tau))
              for tau in thresholds]
    found += [Decoder(f"BD3 WINO tau1={tau} tau2=0.9", "bd3", SamplerConfig.from_flags("wino", tau1=tau, tau2=0.9))
              for tau in wino_tau1]
    return found


# ------------------------------------------------------------------------------------------------ training
def train_run(command: str, preset: str, folder: Path, overrides: list[str]) -> Path:
    """Train (or resume, or reuse when finished) one run through the library's command line; returns its folder."""
    code = cli_main([command, "--config", preset, *overrides, f"train.out_dir={folder}"])
    if code != 0:
        raise SystemExit(f"{command} --config {preset} failed (exit {code})")
    return folder


def final_validation(folder: Path) -> float:
    """The last validation NLL / NELBO (nats per token) recorded in a run's metrics."""
    records = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    values = [r["nats_per_token"] for r in records if r.get("split") == "val"]
    return values[-1] if values else float("nan")


# ------------------------------------------------------------------------------------------------ decoding
def decode(decoder: Decoder, model, prompts: torch.Tensor, length: int, mask_id: int, seed: int
           ) -> tuple[list[list[int]], float, int]:
    """Continue every prompt row (int64 [B, P]) by `length` tokens; returns (continuations, seconds, model calls
    per row: denoising passes for BD3 (commit passes excluded), steps for AR)."""
    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    if decoder.model == "ar":
        result, seconds = timed(lambda: generate_autoregressive(model, prompts, length, generator=generator,
                                                                use_cache=decoder.use_cache), prompts.device)
        return result.tokens[:, prompts.shape[1]:].tolist(), seconds, result.stats.forward_passes
    blocks = build_decoder(model, DiffusionConfig(block_size=BLOCK), decoder.spec, mask_id)
    result, seconds = timed(lambda: generate_long(blocks, prompts.tolist(), max_length=length, steps_per_block=BLOCK,
                                                  generator=generator), prompts.device)
    return result.sequences, seconds, result.stats.forward_passes


def measure(decoder: Decoder, model, prompts: torch.Tensor, length: int, mask_id: int, batch_one: int
            ) -> dict[str, object]:
    """Decode all prompts at batch 16 (quality and batch-16 speed) and the first `batch_one` one at a time."""
    rows, seconds16, calls16 = [], 0.0, 0
    for start in range(0, len(prompts), 16):
        out, seconds, calls = decode(decoder, model, prompts[start:start + 16], length, mask_id, seed=start)
        rows += out
        seconds16 += seconds
        calls16 += calls
    seconds1, calls1 = 0.0, 0
    for index in range(batch_one):
        _, seconds, calls = decode(decoder, model, prompts[index:index + 1], length, mask_id, seed=10_000 + index)
        seconds1 += seconds
        calls1 += calls
    return {"rows": rows, "tokens_per_s_b16": sum(map(len, rows)) / seconds16,
            "tokens_per_s_b1": batch_one * length / seconds1, "calls_per_token": calls1 / (batch_one * length)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training updates of the BD3 and the AR model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--judge-steps", type=int, default=600)
    parser.add_argument("--runs", default="runs/bd3-vs-ar", help="folder for the three run folders")
    parser.add_argument("--bd3-run", help="use this trained BD3 run instead of training one")
    parser.add_argument("--ar-run", help="use this trained AR (train-judge) run instead of training one")
    parser.add_argument("--judge-run", help="use this train-judge run as the judge instead of training one")
    parser.add_argument("--cache-dir", default="data_cache")
    parser.add_argument("--samples", type=int, default=32, help="continuations decoded at batch 16 per setting")
    parser.add_argument("--batch-one", type=int, default=4, help="continuations decoded one at a time per setting")
    parser.add_argument("--length", type=int, default=112, help="generated tokens per continuation")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7, 0.5])
    parser.add_argument("--wino-tau1", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    runs = Path(args.runs)
    common = [f"data.cache_dir={args.cache_dir}", "data.seq_len=128", f"train.batch_size={args.batch}",
              f"train.lr={args.lr}", "train.warmup_steps=50", "train.lr_schedule=cosine", "train.ema_decay=0.99",
              "train.log_every=50", "train.keep_last=1", f"train.device={device}"]
    budget = [f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}"]
    bd3_dir = Path(args.bd3_run or train_run("train", "bd3-tiny-cpu", runs / "bd3", PLAIN + common + budget))
    ar_dir = Path(args.ar_run or train_run("train-judge", "judge-tiny", runs / "ar", common + budget))
    judge_dir = Path(args.judge_run or train_run(
        "train-judge", "judge-tiny", runs / "judge", common + ["train.seed=1", f"train.steps={args.judge_steps}",
                                                               f"train.eval_every={args.judge_steps}",
                                                               f"train.ckpt_every={args.judge_steps}"]))
    bd3, ar, judge = (load_pretrained(folder, device) for folder in (bd3_dir, ar_dir, judge_dir))
    if not bd3.tokenizer.fingerprint() == ar.tokenizer.fingerprint() == judge.tokenizer.fingerprint():
        raise SystemExit("the three runs must share one tokenizer (the same corpus and tokenizer settings)")
    tokenizer = bd3.tokenizer

    val = checkpoint_corpus_split(bd3.config.data, tokenizer, "val")
    if BLOCK + args.length > val.seq_len:
        raise SystemExit(f"prompt {BLOCK} + length {args.length} exceeds the training context {val.seq_len}")
    picks = torch.linspace(0, val.num_sequences - 1, args.samples).long()
    sequences = val.get(picks)
    prompts = sequences[:, :BLOCK].to(device)
    scorer = LoopedJudge(judge.model, tokenizer, judge.config.data.seq_len, name=str(judge.path))

    def quality(rows: list[list[int]]) -> dict[str, float]:
        report = generative_perplexity(scorer, [tokenizer.decode(r) for r in rows], rows)
        return {"gen_ppl": report.gen_ppl, "entropy": report.entropy, "distinct_2": report.distinct[2]}

    reference = quality(sequences[:, BLOCK:BLOCK + args.length].tolist())
    results = []
    for decoder in decoders(args.thresholds, args.wino_tau1):
        model = (bd3 if decoder.model == "bd3" else ar).model
        measured = measure(decoder, model, prompts, args.length, tokenizer.mask_id, args.batch_one)
        results.append({"decoder": decoder.name, **quality(measured.pop("rows")), **measured})
        print(json.dumps(results[-1]), flush=True)

    ar_row = results[0]
    table = [["validation text", "-", "-", "-", f"{reference['gen_ppl']:.2f}", f"{reference['entropy']:.3f}",
              f"{reference['distinct_2']:.3f}"]]
    table += [[r["decoder"], f"{r['tokens_per_s_b1']:.0f}", f"{r['tokens_per_s_b16']:.0f}",
               f"{r['calls_per_token']:.2f}", f"{r['gen_ppl']:.2f}", f"{r['entropy']:.3f}", f"{r['distinct_2']:.3f}"]
              for r in results]
    verdicts = []
    for key, label in (("tokens_per_s_b1", "batch 1"), ("tokens_per_s_b16", "batch 16")):
        winners = [r["decoder"] for r in results[2:]
                   if r[key] > ar_row[key] and r["gen_ppl"] <= 1.1 * ar_row["gen_ppl"]]
        verdicts.append(f"{label}: " + (f"met by {', '.join(winners)}" if winners else "missed"))
    clock = "wall seconds (CUDA)" if device.type == "cuda" else f"process CPU seconds, {args.threads} thread(s)"
    body = (
        f"### Block diffusion against autoregression\n\n"
        f"Same 4-layer d=128 transformer (no looped core), char-level Shakespeare, seq 128, both trained "
        f"{args.steps} updates x batch {args.batch} (lr {args.lr}, cosine, 50 warm-up, EMA 0.99): BD3 with L' = "
        f"{BLOCK} (validation NELBO {final_validation(bd3_dir):.3f} nats/char) and AR next-token "
        f"(validation NLL {final_validation(ar_dir):.3f} nats/char). Judge: a separately trained AR model of the same "
        f"architecture (seed 1, {args.judge_steps if not args.judge_run else 'its own'} updates; validation NLL "
        f"{final_validation(judge_dir):.3f}). Each setting continues {args.samples} 16-character validation prompts "
        f"by {args.length} characters at temperature 1 (batch 16; gen-PPL, entropy in nats and distinct-2 over "
        f"these continuations, without the prompt) and the first {args.batch_one} prompts one at a time (batch 1). "
        f"tokens/s = generated tokens per {clock}; model calls / token at batch 1 (BD3: denoising passes, one "
        f"clean commit pass per block not counted). Both decoders use KV caches.\n\n"
        + markdown_table(["decoder", "tok/s batch 1", "tok/s batch 16", "model calls / token", "gen-PPL",
                          "entropy", "distinct-2"], table)
        + "\n\nTarget (a BD3 setting faster than AR-with-cache at gen-PPL within 10% of AR's): "
        + "; ".join(verdicts) + ".")
    print(body)
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": reference, "results": results}, indent=1))
    if not args.no_write:
        write_section("bench-bd3-vs-ar", body)


if __name__ == "__main__":
    main()
