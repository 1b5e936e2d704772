"""Data layer: tokenizers, text sources, and prepared token corpora (memmap datasets and batch samplers)."""

from loopdlm.data.batches import SequenceSampler
from loopdlm.data.corpus import Manifest, TokenDataset, load_manifest, prepare_corpus
from loopdlm.data.sources import resolve_source
from loopdlm.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "Manifest",
    "SequenceSampler",
    "TokenDataset",
    "Tokenizer",
    "build_tokenizer",
    "load_manifest",
    "load_tokenizer",
    "prepare_corpus",
    "resolve_source",
    "train_bpe",
]
