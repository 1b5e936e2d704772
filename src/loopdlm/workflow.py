"""Glue shared by the CLI, benchmarks and experiments: config -> data, model, objective; checkpoint -> model."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from loopdlm.config import DataConfig, RunConfig
from loopdlm.data.corpus import Manifest, SequenceSampler, TokenDataset, load_manifest, prepare_corpus
from loopdlm.data.sources import resolve_source
from loopdlm.data.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from loopdlm.diffusion.masked import MaskedDiffusion
from loopdlm.diffusion.schedules import make_schedule
from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer, ModelConfig
from loopdlm.train.distributed import DistInfo, barrier, resolve_device  # noqa: F401  (re-exported)
from loopdlm.train.checkpoint import TOKENIZER_DIR, load_checkpoint_config, load_model_weights, resolve_checkpoint


@dataclass
class PreparedCorpus:
    """A tokenised corpus on disk: its folder, tokenizer and manifest."""

    directory: Path
    tokenizer: Tokenizer
    manifest: Manifest


def prepare_data(data: DataConfig) -> PreparedCorpus:
    """Resolve `data.source`, build its tokenizer once, and tokenise it into a cached memmap folder.

    The folder name is derived from the source fingerprint and the tokenizer settings, so a second call (or a second
    run on the same corpus) reuses both the tokenizer and the token file.
    """
    cache = Path(data.cache_dir)
    documents, fingerprint = resolve_source(data.source, cache)
    settings = f"{data.tokenizer}-{data.vocab_size if data.tokenizer == 'bpe' else 0}-{data.val_fraction}"
    key = hashlib.sha256(f"{fingerprint}:{settings}".encode()).hexdigest()[:16]
    directory = cache / "corpora" / key
    tokenizer_dir = directory / "tokenizer"
    if (directory / "manifest.json").is_file() and tokenizer_dir.is_dir():
        return PreparedCorpus(directory, load_tokenizer(tokenizer_dir), load_manifest(directory))
    tokenizer = build_tokenizer(data.tokenizer, (text for _, text in documents), data.vocab_size)
    manifest = prepare_corpus(documents, directory, tokenizer, fingerprint, data.val_fraction)
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


def build_model(model: ModelConfig, vocab_size: int, model_class: type[LoopedTransformer] = LoopedTransformer
                ) -> LoopedTransformer:
    """A fresh `model_class` network; `model.vocab_size` 0 means "take the tokenizer's"."""
    if model.vocab_size == 0:
        model.vocab_size = vocab_size
    if model.vocab_size != vocab_size:
        raise UserError(f"model.vocab_size={model.vocab_size} does not match the tokenizer's {vocab_size} ids")
    try:
        return model_class(model)
    except ValueError as exc:
        raise UserError(f"bad model config: {exc}") from None


def build_objective(config: RunConfig, mask_id: int):
    """MDLM when no block size (or one equal to the sequence length) is set, block diffusion otherwise."""
    diffusion = config.diffusion
    block = diffusion.block_size
    if block is not None and block < config.data.seq_len:
        from loopdlm.diffusion.block import build_block_objective

        return build_block_objective(diffusion, mask_id, config.data.seq_len)
    return MaskedDiffusion(mask_id, make_schedule(diffusion.schedule, diffusion.eps), diffusion.antithetic)


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


def load_pretrained(checkpoint: str | Path, device: torch.device | str = "cpu", use_ema: bool = True) -> LoadedModel:
    """Load config, tokenizer and (EMA) weights of a checkpoint (a run folder or a step folder) in eval mode.

    Raises UserError for a missing/corrupt checkpoint or a tokenizer whose vocabulary does not match the model.
    """
    path = resolve_checkpoint(checkpoint)
    config = load_checkpoint_config(path)
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    if config.model.vocab_size != tokenizer.vocab_size:
        raise UserError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} ids but the model expects "
                        f"{config.model.vocab_size}")
    model = build_model(config.model, tokenizer.vocab_size)
    load_model_weights(path, model, use_ema=use_ema)
    return LoadedModel(model.to(device).eval(), tokenizer, config, path)
