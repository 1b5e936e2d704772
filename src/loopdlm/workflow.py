"""Glue shared by the CLI, benchmarks and experiments: config -> data, model, objective; checkpoint -> model."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loopdlm.config import DataConfig, RunConfig
from loopdlm.data.corpus import Manifest, SequenceSampler, TokenDataset, load_manifest, prepare_corpus
from loopdlm.data.sources import resolve_source
from loopdlm.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from loopdlm.diffusion.loop_supervision import LoopSupervision
from loopdlm.diffusion.masked import MaskedDiffusion
from loopdlm.diffusion.schedules import make_schedule
from loopdlm.errors import UserError, os_error_text
from loopdlm.models.transformer import LoopedTransformer, ModelConfig
from loopdlm.train.distributed import DistInfo, barrier, resolve_device  # noqa: F401  (re-exported)
from loopdlm.train.checkpoint import TOKENIZER_DIR, load_checkpoint_config, load_model_weights, resolve_checkpoint
from loopdlm.train.trainer import derived_seed

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


def corpus_sources(corpus: PreparedCorpus, config: RunConfig, dist: DistInfo
                   ) -> tuple[CorpusBatchSource, CorpusBatchSource]:
    """This rank's (train, validation) batch streams over a prepared corpus, seeded from `config.train.seed`; the
    validation stream knows its characters per token (for bits/character)."""
    seq_len, batch, seed = config.data.seq_len, config.train.batch_size, config.train.seed
    train, val = (TokenDataset(corpus.directory, split, seq_len) for split in ("train", "val"))
    return (CorpusBatchSource(train, batch, seed + SPLIT_SEED_OFFSET["train"], dist.rank, dist.world_size),
            CorpusBatchSource(val, batch, seed + SPLIT_SEED_OFFSET["val"], dist.rank, dist.world_size,
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
    """A fresh network on the CPU; `model.vocab_size` 0 means "take the tokenizer's".

    With `seed`, the initial weights are a fixed function of (seed, model config): they are drawn inside a forked
    CPU random state seeded from `seed`, so the same command starts from the same weights on every device and
    process, and the caller's global random state is left as it was.
    """
    if model.vocab_size == 0:
        model.vocab_size = vocab_size
    if model.vocab_size != vocab_size:
        raise UserError(f"model.vocab_size={model.vocab_size} does not match the tokenizer's {vocab_size} ids")
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


class CorpusBatchSource:
    """Batches of fixed-length token sequences from a prepared corpus split (the trainer's BatchSource).
    characters_per_token, when known, lets the trainer report bits per character."""

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 characters_per_token: float | None = None):
        self.dataset = dataset
        self.characters_per_token = characters_per_token
        self.sampler = SequenceSampler(dataset.num_sequences, batch_size, seed, rank=rank, world_size=world_size)

    def next_batch(self) -> tuple[torch.Tensor, None]:
        """-> (x0 int64 [B, seq_len], None): every token is noised."""
        return self.dataset.get(self.sampler.next_batch()), None

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


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
