"""Glue shared by the CLI, benchmarks and experiments: config -> data, model, objective; checkpoint -> model."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loopdlm.config import DataConfig, RunConfig
from loopdlm.data.batches import BatchSource, RowSource
from loopdlm.data.file_tasks import FileTask
from loopdlm.data.task_source import encode_task, task_examples, task_rows, task_tokenizer
from loopdlm.data.task_spec import get_task
from loopdlm.data.corpus import Manifest, TokenDataset, load_manifest, prepare_corpus
from loopdlm.data.sources import resolve_source
from loopdlm.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from loopdlm.diffusion.loop_supervision import LoopSupervision
from loopdlm.diffusion.masked import MaskedDiffusion
from loopdlm.diffusion.schedules import make_schedule
from loopdlm.errors import UserError, os_error_text
from loopdlm.models.transformer import LoopedTransformer, ModelConfig
from loopdlm.train.autoregressive import NextTokenObjective
from loopdlm.train.distributed import DistInfo, barrier, resolve_device, setup_distributed  # noqa: F401
from loopdlm.train.checkpoint_files import TOKENIZER_DIR, load_checkpoint_config, load_model_weights, resolve_checkpoint
from loopdlm.train.trainer import Trainer, derived_seed

logger = logging.getLogger(__name__)


@dataclass
class PreparedCorpus:
    """A tokenised corpus on disk: its folder, tokenizer and manifest."""

    directory: Path
    tokenizer: Tokenizer
    manifest: Manifest


def prepare_data(data: DataConfig) -> PreparedCorpus:
    """Resolve `data.source`, build its tokenizer once, and tokenise it into a cached memmap folder.

    The folder name is derived from the source fingerprint and the tokenizer settings, so a second call (or a second
    run on the same corpus) reuses both the tokenizer and the token file. A file-system failure (full disk,
    unwritable or misplaced cache_dir) is a one-line UserError; an interrupted preparation is redone next time.
    """
    cache = Path(data.cache_dir)
    if cache.exists() and not cache.is_dir():
        raise UserError(f"data.cache_dir {cache} is a file, not a folder")
    try:
        documents, fingerprint = resolve_source(data.source, cache)
        settings = f"{data.tokenizer}-{data.vocab_size if data.tokenizer == 'bpe' else 0}-{data.val_fraction}"
        key = hashlib.sha256(f"{fingerprint}:{settings}".encode()).hexdigest()[:16]
        directory = cache / "corpora" / key
        tokenizer_dir = directory / "tokenizer"
        if (directory / "manifest.json").is_file() and tokenizer_dir.is_dir():
            logger.info("data: %s, prepared earlier in %s", data.source, directory)
            return PreparedCorpus(directory, load_tokenizer(tokenizer_dir), load_manifest(directory))
        logger.info("data: preparing %s once: building a %s tokenizer and writing its tokens to %s", data.source,
                    data.tokenizer, directory)
        tokenizer = build_tokenizer(data.tokenizer, (text for _, text in documents), data.vocab_size)
        manifest = prepare_corpus(documents, directory, tokenizer, fingerprint, data.val_fraction)
    except OSError as err:
        raise UserError(f"cannot prepare {data.source} in {cache}: {os_error_text(err)}") from None
    return PreparedCorpus(directory, tokenizer, manifest)


def checkpoint_corpus_split(data: DataConfig, tokenizer: Tokenizer, split: str) -> TokenDataset:
    """A split of the corpus a checkpoint was trained on (prepared on first use), refusing data tokenised
    differently from the checkpoint's `tokenizer` (UserError)."""
    corpus = prepare_data(data)
    if corpus.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise UserError(f"the corpus {data.source!r} was tokenised differently from the checkpoint's tokenizer")
    return TokenDataset(corpus.directory, split, data.seq_len)


def prepare_data_distributed(data: DataConfig, dist: DistInfo) -> PreparedCorpus:
    """`prepare_data` on rank 0 first; the other ranks wait, then open the prepared (cached) corpus."""
    corpus = prepare_data(data) if dist.is_main else None
    barrier(dist)
    return corpus or prepare_data(data)


#: The batch order of a split is seeded with train.seed + this offset (`loopdlm eval` replays the validation one).
SPLIT_SEED_OFFSET = {"train": 0, "val": 1}


def corpus_sources(corpus: PreparedCorpus, config: RunConfig, dist: DistInfo) -> tuple[RowSource, RowSource]:
    """This rank's (train, validation) batch streams over a prepared corpus, seeded from `config.train.seed`; the
    validation stream knows its characters per token (for bits/character)."""
    seq_len, batch, seed = config.data.seq_len, config.train.batch_size, config.train.seed
    train, val = (TokenDataset(corpus.directory, split, seq_len) for split in ("train", "val"))
    return (RowSource(train, batch, seed + SPLIT_SEED_OFFSET["train"], dist.rank, dist.world_size),
            RowSource(val, batch, seed + SPLIT_SEED_OFFSET["val"], dist.rank, dist.world_size,
                      characters_per_token=val.characters_per_token(corpus.tokenizer)))


def auto_threads(cores: int, load: float, processes: int = 1) -> int:
    """Threads per process for `cores` usable cores of which `load` are busy, shared by `processes` training
    processes: the idle cores, at least 1. On a busy machine extra threads spin against other processes; measured on
    2 busy cores (docs/benchmarks.md), 2 threads ran a tiny-cpu step 6-11x slower than 1."""
    return max(1, int(cores - load + 0.5) // max(processes, 1))


def busy_cores(window: float = 0.3) -> float:
    """How many cores other work keeps busy now: the machine's non-idle CPU share over `window` seconds (from
    /proc/stat) times its core count. The 1-minute load average, the fallback where /proc/stat is missing, lags: just
    after an install it still reads about 1 on an idle machine, which would halve a 2-core run."""
    def sample() -> list[int]:
        with open("/proc/stat") as handle:
            return [int(value) for value in handle.readline().split()[1:]]

    try:
        first = sample()
        time.sleep(window)
        second = sample()
    except (OSError, ValueError):
        return os.getloadavg()[0]
    delta = [b - a for a, b in zip(first, second)]
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    total = sum(delta[:8])  # user..steal; guest time is already counted in user
    return (1 - idle / total) * (os.cpu_count() or 1) if total > 0 else 0.0


def set_torch_threads(requested: int) -> str:
    """Set torch's CPU thread count: `requested` when > 0, else OMP_NUM_THREADS when set (torch read it at start),
    else `auto_threads` shared by this node's LOCAL_WORLD_SIZE processes. Returns a description for the start-up
    line, e.g. '1 thread (auto: 2 cores, load 3.1)'."""
    if requested < 0:
        raise UserError(f"train.threads must be >= 0 (0 = automatic), got {requested}")
    if requested:
        threads, why = requested, "train.threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        threads, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        cores, load = len(os.sched_getaffinity(0)), busy_cores()
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads, why = auto_threads(cores, load, processes), f"auto: {cores} cores, {load:.1f} busy"
    torch.set_num_threads(threads)
    return f"{threads} thread{'s' if threads > 1 else ''} ({why})"


def absolute_paths(config: RunConfig) -> None:
    """Make the file paths of `config` absolute in place (text:/jsonl: sources, data.cache_dir, train.init_from),
    so the config saved with a checkpoint works from any folder (eval, sample, a resume elsewhere)."""
    data = config.data
    kind, sep, rest = data.source.partition(":")
    if sep and kind in ("text", "jsonl") and rest:
        data.source = f"{kind}:{os.path.abspath(rest)}"
    data.cache_dir = os.path.abspath(data.cache_dir)
    if config.train.init_from:
        config.train.init_from = os.path.abspath(config.train.init_from)


def build_model(model: ModelConfig, vocab_size: int, *, seed: int | None = None) -> LoopedTransformer:
    """A fresh network on the CPU; `model.vocab_size` 0 means "take the tokenizer's" (the network's own config,
    `.config`, then holds it; `model` itself is not changed).

    With `seed`, the initial weights are a fixed function of (seed, model config): they are drawn inside a forked
    CPU random state seeded from `seed`, so the same command starts from the same weights on every device and
    process, and the caller's global random state is left as it was.
    """
    if model.vocab_size not in (0, vocab_size):
        raise UserError(f"model.vocab_size={model.vocab_size} does not match the tokenizer's {vocab_size} ids")
    model = dataclasses.replace(model, vocab_size=vocab_size)  # the caller's config stays as it was
    seeded = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    try:
        with seeded:
            if seed is not None:
                torch.manual_seed(derived_seed("init", seed))
            return LoopedTransformer(model)
    except ValueError as exc:
        raise UserError(f"bad model config: {exc}") from None


def build_objective(config: RunConfig, mask_id: int):
    """The scoring objective: MDLM when no block size (or one equal to the sequence length) is set, block
    diffusion otherwise."""
    diffusion = config.diffusion
    block = diffusion.block_size
    if block is not None and block < config.data.seq_len:
        from loopdlm.diffusion.block import build_block_objective

        return build_block_objective(diffusion, mask_id, config.data.seq_len)
    return MaskedDiffusion(mask_id, make_schedule(diffusion.schedule, diffusion.eps), diffusion.antithetic)


def build_training_objective(config: RunConfig, mask_id: int):
    """`build_objective`, wrapped in per-loop supervision when `diffusion.loop_supervision` > 0 (its `bound`, the
    reported NELBO, stays the scoring objective's)."""
    weight = config.diffusion.loop_supervision
    if weight < 0:
        raise UserError(f"diffusion.loop_supervision must be >= 0, got {weight}")
    objective = build_objective(config, mask_id)
    return LoopSupervision(objective, weight) if weight else objective


@dataclass
class LoadedModel:
    """A model restored from a checkpoint, ready for evaluation or sampling."""

    model: LoopedTransformer
    tokenizer: Tokenizer
    config: RunConfig
    path: Path


def load_pretrained(checkpoint: str | Path, device: torch.device | str = "cpu", use_ema: bool = True,
                    denoiser: bool = False) -> LoadedModel:
    """Load config, tokenizer and (EMA) weights of a checkpoint (a run folder or a step folder) in eval mode.

    Raises UserError for a missing/corrupt checkpoint, a tokenizer whose vocabulary does not match the model, or
    (with `denoiser`) a causal judge where a diffusion model is needed.
    """
    path = resolve_checkpoint(checkpoint)
    config = load_checkpoint_config(path)
    if denoiser and config.model.causal:
        raise UserError(f"checkpoint {path} is an autoregressive judge (model.causal), not a diffusion model; "
                        "use it with `loopdlm genppl --judge`")
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    if config.model.vocab_size != tokenizer.vocab_size:
        raise UserError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} ids but the model expects "
                        f"{config.model.vocab_size}")
    model = build_model(config.model, tokenizer.vocab_size)
    load_model_weights(path, model, use_ema=use_ema)
    return LoadedModel(model.to(device).eval(), tokenizer, config, path)


@dataclass
class Run:
    """An assembled training run (`build_run`): call `trainer.fit()`.

    corpus: the prepared corpus of a corpus run (None for a task run or given sources); train_examples: the
    number of training examples of a task run.
    """

    config: RunConfig
    dist: DistInfo
    tokenizer: Tokenizer | None
    model: LoopedTransformer
    trainer: Trainer
    threads: str
    corpus: PreparedCorpus | None = None
    train_examples: int | None = None


def build_run(config: RunConfig, *, dist: DistInfo | None = None, tokenizer: Tokenizer | None = None,
              examples: tuple[int | None, int | None] = (None, None), val_seed: int | None = None,
              sources: tuple[BatchSource, BatchSource | None] | None = None, vocab_size: int | None = None,
              resume: bool | None = None) -> Run:
    """The one way to assemble a training run: config -> data -> model -> objective -> sources -> Trainer.

    The data is `config.data`: a task (`data.task`; its char tokenizer unless `tokenizer` is given, rows of the
    task's width, answer-only noise; `examples` = (train, val) counts, default 20000 / 256 for a generated task and
    all of a file's split) or a corpus (prepared on rank 0 first). `sources` (with `vocab_size`) replaces the data
    by given batch streams (benchmarks on random tokens). The objective is the next-token NLL for a causal model
    (a judge), else the diffusion objective of `config.diffusion`. `val_seed` seeds the validation order
    (default train.seed + 1). The run owns `config`: its paths become absolute, a task fills data.tokenizer and
    data.seq_len, and config.model gets the vocabulary size the model was built with.
    """
    absolute_paths(config)
    dist = dist if dist is not None else setup_distributed(config.train.device)
    threads = set_torch_threads(config.train.threads)
    seed, batch = config.train.seed, config.train.batch_size
    val_seed = seed + SPLIT_SEED_OFFSET["val"] if val_seed is None else val_seed
    corpus, train_examples = None, None
    if sources is not None:
        train_source, val_source = sources
        if vocab_size is None:
            raise ValueError("build_run with given sources needs their vocab_size")
    elif config.data.task:
        tokenizer, train_source, val_source, train_examples = _task_sources(config, dist, tokenizer, examples,
                                                                             val_seed)
        vocab_size = tokenizer.vocab_size
    else:
        corpus = prepare_data_distributed(config.data, dist)
        tokenizer = corpus.tokenizer
        train_source, val_source = corpus_sources(corpus, config, dist)
        if val_seed != seed + SPLIT_SEED_OFFSET["val"]:
            val_source = RowSource(val_source.rows, batch, val_seed, dist.rank, dist.world_size,
                                   val_source.characters_per_token)
        vocab_size = tokenizer.vocab_size
    model = build_model(config.model, vocab_size, seed=seed)
    config.model = model.config
    mask_id = tokenizer.mask_id if tokenizer is not None else vocab_size - 1
    objective = NextTokenObjective() if config.model.causal else build_training_objective(config, mask_id)
    trainer = Trainer(config, model, objective, train_source, val_source, config.train.out_dir,
                      tokenizer=tokenizer, dist=dist, resume=resume)
    return Run(config, dist, tokenizer, model, trainer, threads, corpus, train_examples)


def _task_sources(config: RunConfig, dist: DistInfo, tokenizer: Tokenizer | None,
                  examples: tuple[int | None, int | None], val_seed: int):
    """(tokenizer, train source, val source, training examples) of a task run; fills data.tokenizer/seq_len."""
    task = get_task(config.data.task)
    tokenizer = tokenizer or task_tokenizer(task)
    config.data.tokenizer = tokenizer.kind
    config.data.seq_len = sum(task.row_widths(tokenizer))
    # A task file gives all of its split by default; a generated task as many as asked.
    from_file = isinstance(task, FileTask)
    train_count = examples[0] if examples[0] is not None else (None if from_file else 20000)
    val_count = examples[1] if examples[1] is not None else (None if from_file else 256)
    seed, batch = config.train.seed, config.train.batch_size
    train_examples = task_examples(task, train_count, seed, "train")
    val_examples = task_examples(task, val_count, seed, "val", unique=True)
    unanswered = sum(not e.answer for e in train_examples + val_examples)
    if unanswered:
        raise UserError(f"{unanswered} {task.name} examples have no answer (e.g. puzzles without a solution); "
                        "training needs answers")
    if len(train_examples) < batch * dist.world_size:
        raise UserError(f"{len(train_examples)} training examples cannot fill a batch of {batch} x {dist.world_size}")
    val_batch = max(1, min(batch, len(val_examples) // dist.world_size))
    train_rows = task_rows(encode_task(task, train_examples, tokenizer))
    val_rows = task_rows(encode_task(task, val_examples, tokenizer))
    return (tokenizer, RowSource(train_rows, batch, seed, dist.rank, dist.world_size),
            RowSource(val_rows, val_batch, val_seed, dist.rank, dist.world_size), len(train_examples))
