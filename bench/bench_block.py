"""Block diffusion (BD3-LM): KV-cached vs uncached generation speed, training step time vs MDLM, and the quality
and memory cost of the flat-in-S cache (`reuse_last_loop`).

    python bench/bench_block.py [--gen-tokens 1024] [--train-steps 200] [--threads 1] [--sections ...] [--no-write]

Times are process CPU seconds (`time.process_time`, one thread by default), which a shared, oversubscribed machine
disturbs far less than wall time.

1. Generation of --gen-tokens tokens with L' = 16 (top-k selector, 16 steps per block: about one forward pass per
   token) by a 4-layer d=128 model, batch 1, through the shared loop with `CachedBlockPredictor` and with
   `UncachedBlockPredictor` (recomputes prefix + block every step); same seed, tokens must be identical.
2. Training step (forward + backward + AdamW) of the BD3 objective ([x_t ; x_0], dense mask) vs MDLM on the same
   model and batch.
3. reuse_last_loop: a looped model (core = layers 1-2, S ~ U{1..4}) is trained briefly with BD3 (L' = 16) on
   character-level Shakespeare; the held-out block NELBO is then computed block by block through the cache, exactly
   (every loop's keys) and with only the last loop's keys served for every loop, on the same noise draw.
Results go to the `bench-block` section of docs/benchmarks.md unless --no-write.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown_table, write_section  # noqa: E402

from loopdlm.data.sources import resolve_source  # noqa: E402
from loopdlm.data.tokenizers import CharTokenizer  # noqa: E402
from loopdlm.diffusion.block import BlockDiffusion, BlockNoise  # noqa: E402
from loopdlm.diffusion.masked import MaskedDiffusion  # noqa: E402
from loopdlm.models.transformer import LoopedTransformer, ModelConfig  # noqa: E402
from loopdlm.sampling.engine import generate  # noqa: E402
from loopdlm.sampling.kv_cache import CacheOptions, CachedBlockPredictor, UncachedBlockPredictor  # noqa: E402
from loopdlm.sampling.loops import FixedLoops  # noqa: E402
from loopdlm.sampling.selectors import FixedScheduleSelector  # noqa: E402

MASK = 0
BLOCK = 16
SMALL = dict(n_layers=4, d_model=128, n_heads=4)
LOOPED = dict(SMALL, core_start=1, core_end=3, max_loops=4)


def make_model(vocab: int, fields: dict, seed: int = 0) -> LoopedTransformer:
    """A model with the default N(0, 0.02) initialisation."""
    torch.manual_seed(seed)
    return LoopedTransformer(ModelConfig(vocab_size=vocab, **fields))


def denoiser_of(model: LoopedTransformer, loops: int):
    """The trainer's view: (tokens, position_ids, attn_mask) -> logits with S bound."""
    return lambda tokens, position_ids=None, attn_mask=None: model(
        tokens, loops=loops, position_ids=position_ids, attn_mask=attn_mask).logits


# ------------------------------------------------------------------------------------------------ generation
def timed_generation(model: LoopedTransformer, make_denoiser, length: int, loops: int, seed: int = 0):
    """Generate `length` tokens after one prompt block; returns (tokens [1, N], CPU seconds, forward passes)."""
    prompt = torch.randint(3, model.config.vocab_size, (1, BLOCK), generator=torch.Generator().manual_seed(seed))
    canvas = torch.cat((prompt, torch.full((1, length), MASK)), dim=1)
    denoiser = make_denoiser(model, MASK, FixedLoops(loops), BLOCK)
    start = time.process_time()
    result = generate(denoiser, canvas, FixedScheduleSelector(BLOCK), MASK, block_length=BLOCK, align_windows=True,
                      generator=torch.Generator().manual_seed(seed))
    return result.tokens, time.process_time() - start, result.stats.forward_passes


def generation_rows(length: int, vocab: int) -> list[list[object]]:
    """Cached / uncached / reuse_last_loop generation for a plain and a looped model."""
    rows = []
    for name, fields, loops in (("4L d128 plain", SMALL, 1), ("4L d128 core 1-2, S=4", LOOPED, 4)):
        model = make_model(vocab, fields).eval()
        cached, cached_s, passes = timed_generation(model, CachedBlockPredictor, length, loops)
        flat = lambda *a: CachedBlockPredictor(*a, cache_options=CacheOptions(reuse_last_loop=True))  # noqa: E731
        reuse, reuse_s, _ = timed_generation(model, flat, length, loops)
        uncached, uncached_s, _ = timed_generation(model, UncachedBlockPredictor, length, loops)
        same = "yes" if torch.equal(cached, uncached) else "NO"
        agree = float((reuse == cached)[:, BLOCK:].float().mean())
        rows.append([name, length, passes, f"{length / uncached_s:.0f}", f"{length / cached_s:.0f}",
                     f"{uncached_s / cached_s:.1f}x", same, f"{length / reuse_s:.0f}", f"{agree:.2f}"])
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ training
def step_seconds(model: LoopedTransformer, objective, batch: torch.Tensor, loops: int, steps: int) -> float:
    """Mean CPU time of a training step (2 warm-up steps not timed)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 2):
        start = time.process_time()
        loss = objective.nelbo(denoiser_of(model, loops), batch, generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.process_time() - start)
    return sum(times) / len(times)


def training_rows(vocab: int, steps: int) -> list[list[object]]:
    """BD3 vs MDLM training step time for a plain and a looped model."""
    rows = []
    for name, fields, loops, seq_len, batch in (("4L d128 plain", SMALL, 1, 256, 8),
                                                ("4L d128 core 1-2, S=4", LOOPED, 4, 256, 8)):
        tokens = torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        mdlm = step_seconds(make_model(vocab, fields), MaskedDiffusion(MASK), tokens, loops, steps)
        bd3 = step_seconds(make_model(vocab, fields), BlockDiffusion(MASK, BLOCK, seq_len), tokens, loops, steps)
        rows.append([name, f"{batch}x{seq_len}", f"{mdlm * 1e3:.0f}", f"{bd3 * 1e3:.0f}", f"{bd3 / mdlm:.2f}x"])
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ reuse_last_loop
def shakespeare(seq_len: int, cache_dir: Path) -> tuple[CharTokenizer, torch.Tensor, torch.Tensor]:
    """Character-level Shakespeare cut into sequences; returns (tokenizer, train [N, L], held-out [M, L])."""
    documents, _ = resolve_source("shakespeare", cache_dir)
    text = "\n".join(body for _, body in documents)
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    sequences = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    split = int(0.95 * len(sequences))
    return tokenizer, sequences[:split], sequences[split:]


def train_looped(train: torch.Tensor, vocab: int, mask_id: int, steps: int, batch: int) -> LoopedTransformer:
    """Brief BD3 training of the looped model: S ~ U{1..max_loops} per step, AdamW 1e-3 with 20 warm-up steps."""
    model = make_model(vocab, LOOPED)
    objective = BlockDiffusion(mask_id, BLOCK, train.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    generator, draw = torch.Generator().manual_seed(0), random.Random(0)
    for step in range(steps):
        rows = torch.randint(len(train), (batch,), generator=generator)
        loops = draw.randint(1, model.config.max_loops)
        loss = objective.nelbo(denoiser_of(model, loops), train[rows], generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step}: loss {loss.item():.3f} (S={loops})", flush=True)
    return model.eval()


@torch.no_grad()
def cached_nelbo(model: LoopedTransformer, x0: torch.Tensor, noise: BlockNoise, mask_id: int, loops: int,
                 reuse_last_loop: bool) -> tuple[float, int]:
    """Block NELBO (nats/token) computed the way sampling reads the model: each noisy block against the cached clean
    prefix. Returns (NELBO, cache bytes after the last block)."""
    denoiser = CachedBlockPredictor(model, mask_id, FixedLoops(loops), BLOCK,
                                   CacheOptions(reuse_last_loop=reuse_last_loop))
    total = torch.zeros(())
    for start in range(0, x0.shape[1], BLOCK):
        window = slice(start, start + BLOCK)
        canvas = x0.clone()
        canvas[:, window] = noise.xt[:, window]
        denoiser.begin_window(canvas, window)
        log_probs = denoiser(canvas, window, 0.0).log_probs
        nll = -log_probs.gather(-1, x0[:, window, None]).squeeze(-1)
        total += (nll * noise.masked[:, window] * noise.weight[:, window]).sum()
    return float(total / x0.numel()), denoiser.cache.nbytes


def reuse_rows(steps: int, batch: int, cache_dir: Path) -> list[list[object]]:
    """Train the looped model, then compare exact and reuse_last_loop cached NELBO at several S."""
    tokenizer, train, held_out = shakespeare(128, cache_dir)
    model = train_looped(train, tokenizer.vocab_size, tokenizer.mask_id, steps, batch)
    x0 = held_out[:32]
    objective = BlockDiffusion(tokenizer.mask_id, BLOCK, x0.shape[1])
    rows = []
    for loops in (1, 2, 4, 8):
        noise = objective.add_noise(x0, torch.Generator().manual_seed(1), unclipped=True)
        with torch.no_grad():
            vectorised = float(objective.score(denoiser_of(model, loops), x0, noise).nll_sum / x0.numel())
        exact, exact_bytes = cached_nelbo(model, x0, noise, tokenizer.mask_id, loops, reuse_last_loop=False)
        flat, flat_bytes = cached_nelbo(model, x0, noise, tokenizer.mask_id, loops, reuse_last_loop=True)
        rows.append([loops, f"{vectorised:.4f}", f"{exact:.4f}", f"{flat:.4f}", f"{flat - exact:+.4f}",
                     f"{exact_bytes / 2**20:.2f}", f"{flat_bytes / 2**20:.2f}"])
        print(rows[-1], flush=True)
    return rows


def generation_part(length: int, vocab: int, threads: int) -> str:
    """Markdown for section 1."""
    rows = generation_rows(length, vocab)
    return (f"**KV-cached generation** ({length} tokens after a {BLOCK}-token prompt, L' = {BLOCK}, top-k selector "
            f"with {BLOCK} steps per block, batch 1, fp32, {threads} thread(s), random-init weights; tok/s per CPU "
            "second)\n\n"
            + markdown_table(["model", "tokens", "forward passes", "uncached tok/s", "cached tok/s", "speed-up",
                              "identical tokens", "reuse_last_loop tok/s", "reuse_last_loop token agreement"], rows))


def training_part(vocab: int, steps: int) -> str:
    """Markdown for section 2."""
    rows = training_rows(vocab, steps)
    return (f"**Training step** (forward + backward + AdamW, CPU ms per step, dense bool mask; BD3 L' = {BLOCK} runs "
            "[x_t ; x_0] = 2L tokens; FlexAttention has no CPU backward in this torch)\n\n"
            + markdown_table(["model", "batch", "MDLM ms/step", "BD3 ms/step", "BD3 / MDLM"], rows))


def reuse_part(steps: int, batch: int, cache_dir: Path) -> str:
    """Markdown for section 3."""
    rows = reuse_rows(steps, batch, cache_dir)
    return (f"**reuse_last_loop quality cost** (looped 4L d128, core 1-2, trained {steps} steps, batch {batch}, "
            f"S ~ U{{1..4}}, BD3 L' = {BLOCK} on char Shakespeare, seq 128; held-out block NELBO in nats/token on 32 "
            "sequences, one shared unclipped noise draw; cache MiB after the 128 tokens)\n\n"
            + markdown_table(["S", "vectorised", "cached exact", "cached reuse_last_loop", "cost", "exact MiB",
                              "reuse MiB"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-tokens", type=int, default=1024)
    parser.add_argument("--train-steps", type=int, default=200, help="training steps of the reuse_last_loop study")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--step-timing-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default="data_cache")
    parser.add_argument("--sections", nargs="+", default=["generation", "training", "reuse"],
                        choices=["generation", "training", "reuse"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = 96

    parts = []
    if "generation" in args.sections:
        parts.append(generation_part(args.gen_tokens, vocab, args.threads))
    if "training" in args.sections:
        parts.append(training_part(vocab, args.step_timing_steps))
    if "reuse" in args.sections:
        parts.append(reuse_part(args.train_steps, args.train_batch, Path(args.cache_dir)))
    body = "\n\n".join(parts)
    print(body)
    if not args.no_write:
        write_section("bench-block", body)


if __name__ == "__main__":
    main()
