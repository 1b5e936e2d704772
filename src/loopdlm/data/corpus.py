"""Corpus -> one flat memory-mapped token file, fixed-length sequences over it, and a resumable batch sampler.

On-disk layout of a prepared corpus folder:
  tokens.bin       every document's tokens followed by eos, concatenated; raw uint16 (or uint32 for big vocabularies)
  manifest.json    what was tokenized with what (fingerprints), the token count and the train/val split point
  tokenizer/       the tokenizer that produced tokens.bin
The manifest is written last, so a folder with a manifest is always complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loopdlm.data.batches import TokenBatch
from loopdlm.data.tokenizers import Tokenizer
from loopdlm.errors import UserError

TOKENS_FILE = "tokens.bin"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class Manifest:
    """Description of a prepared corpus. The train split is tokens [0, val_start), val is [val_start, num_tokens).
    val_characters: characters of text the val split stands for (see `count_characters`); None in manifests
    written before it was recorded."""

    source_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    num_tokens: int
    num_documents: int
    val_start: int
    val_fraction: float
    vocab_size: int
    created_by: str
    val_characters: int | None = None


def token_dtype(vocab_size: int) -> np.dtype:
    """Storage dtype for ids in [0, vocab_size): uint16 when vocab_size <= 65535, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def load_manifest(out_dir: Path) -> Manifest:
    """Read out_dir/manifest.json; UserError if it is missing or malformed."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"no prepared corpus in {out_dir} ({MANIFEST_FILE} is missing)")
    try:
        manifest = Manifest(**json.loads(path.read_text(encoding="utf-8")))
        consistent = (
            manifest.dtype in ("uint16", "uint32")
            and 0 <= manifest.val_start <= manifest.num_tokens
            and manifest.num_tokens > 0
        )
    except (ValueError, TypeError) as err:  # bad JSON, missing/unknown fields, or fields of the wrong type
        raise UserError(f"corrupt {path}: {' '.join(str(err).split())}") from None
    if not consistent:
        raise UserError(f"corrupt {path}: bad dtype, token count or split point")
    return manifest


def count_characters(ids: np.ndarray, tokenizer: Tokenizer, chunk: int = 1 << 20) -> int:
    """Characters of text that the token ids stand for: the decoded text's length, with each eos counted as one
    character (the document separator it replaced). Decoded in chunks of `chunk` tokens to bound memory (a
    multi-byte character split across a chunk boundary may count one more or less)."""
    total = 0
    for start in range(0, len(ids), chunk):
        piece = np.asarray(ids[start:start + chunk]).tolist()
        total += len(tokenizer.decode(piece)) + piece.count(tokenizer.eos_id)
    return total


def _tokens_file_matches(out_dir: Path, manifest: Manifest) -> bool:
    path = out_dir / TOKENS_FILE
    return path.is_file() and path.stat().st_size == manifest.num_tokens * np.dtype(manifest.dtype).itemsize


def _matching_manifest(
    out_dir: Path, source_fingerprint: str, tokenizer_fingerprint: str, val_fraction: float
) -> Manifest | None:
    """The manifest of a complete corpus in out_dir built from the same inputs, else None."""
    try:
        manifest = load_manifest(out_dir)
    except UserError:
        return None
    same_inputs = (manifest.source_fingerprint, manifest.tokenizer_fingerprint, manifest.val_fraction) == (
        source_fingerprint,
        tokenizer_fingerprint,
        val_fraction,
    )
    return manifest if same_inputs and _tokens_file_matches(out_dir, manifest) else None


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it onto `path` on success, delete it on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_corpus(
    texts: Iterable[tuple[str, str]],
    out_dir: Path,
    tokenizer: Tokenizer,
    source_fingerprint: str,
    val_fraction: float = 0.05,
) -> Manifest:
    """Tokenize (doc_id, text) pairs into out_dir/tokens.bin, save the tokenizer and write the manifest.

    Every non-empty document is followed by eos. The last `val_fraction` of the token stream is the val split.
    If out_dir already holds a complete corpus with the same source fingerprint, tokenizer fingerprint and
    val_fraction, nothing is read or written and its manifest is returned.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_FILE
    tokenizer_fingerprint = tokenizer.fingerprint()
    existing = _matching_manifest(out_dir, source_fingerprint, tokenizer_fingerprint, val_fraction)
    if existing is not None:
        return existing
    # Remove a stale manifest first so that an interrupted rebuild can never look complete.
    manifest_path.unlink(missing_ok=True)

    dtype = token_dtype(tokenizer.vocab_size)
    num_tokens = num_documents = 0
    with _atomic_path(out_dir / TOKENS_FILE) as tmp, open(tmp, "wb") as stream:
        for doc_id, text in texts:
            try:
                ids = tokenizer.encode(text)
            except UserError as err:
                raise UserError(f"document {doc_id!r}: {err}") from None
            if not ids:
                continue
            ids.append(tokenizer.eos_id)
            np.asarray(ids, dtype=dtype).tofile(stream)
            num_tokens += len(ids)
            num_documents += 1
        if num_tokens == 0:
            raise UserError(f"corpus for {out_dir} is empty: no document has any text")
        val_start = num_tokens - round(num_tokens * val_fraction)
        stream.flush()
        val_characters = count_characters(np.memmap(tmp, dtype=dtype, mode="r")[val_start:], tokenizer)
    tokenizer.save(out_dir / TOKENIZER_DIR)

    manifest = Manifest(
        source_fingerprint=source_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        dtype=dtype.name,
        num_tokens=num_tokens,
        num_documents=num_documents,
        val_start=val_start,
        val_fraction=val_fraction,
        vocab_size=tokenizer.vocab_size,
        created_by=f"loopdlm {importlib.metadata.version('loopdlm')}",
        val_characters=val_characters,
    )
    with _atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(manifest), indent=2) + "\n", encoding="utf-8")
    return manifest


class TokenDataset:
    """Non-overlapping sequences of `seq_len` tokens cut from one split of a prepared corpus (memory-mapped).

    Sequences run across document boundaries; documents are separated by eos inside the stream.
    """

    def __init__(self, out_dir: Path, split: str, seq_len: int):
        """`split`: "train" or "val". UserError if the corpus is missing/corrupt or the split is too short."""
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', got {split!r}")
        if seq_len < 1:
            raise UserError(f"seq_len must be positive, got {seq_len}")
        out_dir = Path(out_dir)
        self.manifest = load_manifest(out_dir)
        if not _tokens_file_matches(out_dir, self.manifest):
            raise UserError(
                f"corrupt corpus in {out_dir}: {TOKENS_FILE} is missing or its size does not match "
                f"{self.manifest.num_tokens} tokens of {self.manifest.dtype}"
            )
        start, stop = (0, self.manifest.val_start) if split == "train" else (self.manifest.val_start, None)
        tokens = np.memmap(out_dir / TOKENS_FILE, dtype=self.manifest.dtype, mode="r")[start:stop]
        self.split = split
        self._tokens = tokens
        self.seq_len = seq_len
        self.num_tokens = len(tokens)
        self.num_sequences = self.num_tokens // seq_len
        if self.num_sequences == 0:
            raise UserError(
                f"the {split} split of {out_dir} has {self.num_tokens} tokens, fewer than one sequence of {seq_len}"
            )
        self._sequences = tokens[: self.num_sequences * seq_len].reshape(self.num_sequences, seq_len)

    def characters_per_token(self, tokenizer: Tokenizer, estimate_from: int = 1 << 20) -> float:
        """Characters of text per token of this split (to turn bits/token into bits/character): recorded in the
        manifest for the val split; otherwise (train split, or a corpus prepared before it was recorded) measured
        on the split's first `estimate_from` tokens."""
        if self.split == "val" and self.manifest.val_characters is not None:
            return self.manifest.val_characters / self.num_tokens
        sample = self._tokens[:estimate_from]
        return count_characters(sample, tokenizer) / len(sample)

    def __len__(self) -> int:
        return self.num_sequences

    def select(self, indices: torch.Tensor) -> TokenBatch:
        """`get(indices)` as a TokenBatch (every position noisable): the corpus as `Rows` of a `RowSource`."""
        return TokenBatch(self.get(indices))

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Sequences at `indices` (LongTensor [B], values in [0, num_sequences)) as a CPU LongTensor [B, seq_len]."""
        rows = indices.cpu().numpy()
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_sequences):
            raise IndexError(f"sequence index out of range [0, {self.num_sequences})")
        return torch.from_numpy(np.asarray(self._sequences[rows], dtype=np.int64))
