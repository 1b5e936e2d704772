"""Tokenizers: a character-level one and a byte-level BPE one, behind one small interface.

Both reserve ids 0, 1, 2 for the special tokens "<|mask|>", "<|pad|>", "<|endoftext|>" (in that order), and neither
ever produces a special id from plain text: specials only enter a sequence when code puts them there.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from loopdlm.errors import UserError

MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (MASK_TOKEN, PAD_TOKEN, EOS_TOKEN)

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"

# Byte-level BPE starts from the 256 byte symbols; a smaller vocabulary could not represent arbitrary text.
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


class Tokenizer(ABC):
    """Text <-> token ids. `vocab_size` counts every id, special tokens included; ids lie in [0, vocab_size)."""

    kind: str
    mask_id: int = SPECIAL_TOKENS.index(MASK_TOKEN)
    pad_id: int = SPECIAL_TOKENS.index(PAD_TOKEN)
    eos_id: int = SPECIAL_TOKENS.index(EOS_TOKEN)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never contains a special id, even if `text` spells one out."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; special ids are dropped when `skip_special`, else written as their token strings."""

    @abstractmethod
    def canonical_json(self) -> str:
        """The tokenizer's full definition as the text written to tokenizer.json."""

    def fingerprint(self) -> str:
        """sha256 hex digest of `canonical_json()`: equal for tokenizers that encode and decode identically."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    def save(self, directory: Path) -> None:
        """Write tokenizer.json and tokenizer_meta.json (kind, vocab size, special ids, fingerprint) to `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(self.canonical_json(), encoding="utf-8")
        meta = {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "mask_id": self.mask_id,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "fingerprint": self.fingerprint(),
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


class CharTokenizer(Tokenizer):
    """One id per character: ids 0-2 are the specials, then the known characters in sorted order.

    Encoding a character outside the vocabulary raises UserError (rather than substituting a placeholder), so that
    round trips are always lossless and a wrong alphabet is noticed at once.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        """`chars`: the single characters of the vocabulary (duplicates are ignored)."""
        alphabet = sorted(set(chars))
        if not alphabet:
            raise UserError("cannot build a char tokenizer from empty text")
        if any(len(c) != 1 for c in alphabet):
            raise UserError("a char tokenizer's vocabulary must contain single characters only")
        self.chars = alphabet
        self._id_of = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)}
        self._token_of = list(SPECIAL_TOKENS) + alphabet

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Tokenizer whose vocabulary is the set of characters in `text`."""
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self._token_of)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id_of[c] for c in text]
        except KeyError as err:
            raise UserError(f"character {err.args[0]!r} is not in the char tokenizer's vocabulary") from None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        first_regular = len(SPECIAL_TOKENS)
        return "".join(self._token_of[i] for i in ids if not (skip_special and i < first_regular))

    def canonical_json(self) -> str:
        return json.dumps({"kind": self.kind, "special_tokens": list(SPECIAL_TOKENS), "chars": self.chars})


class BPETokenizer(Tokenizer):
    """Byte-level BPE (Hugging Face `tokenizers`): lossless for any unicode text, ids 0-2 are the specials."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: HFTokenizer):
        """Wrap a trained or loaded Hugging Face tokenizer whose first three ids are SPECIAL_TOKENS."""
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if hf_tokenizer.token_to_id(token) != expected_id:
                raise UserError(f"BPE tokenizer must have {token!r} at id {expected_id}")
        # Without this, text that spells out "<|endoftext|>" would be encoded as the eos id.
        hf_tokenizer.encode_special_tokens = True
        self._hf = hf_tokenizer

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    def canonical_json(self) -> str:
        return self._hf.to_str()


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE tokenizer with at most `vocab_size` ids (fewer if the texts offer too few merges)."""
    if vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"BPE vocab_size must be at least {MIN_BPE_VOCAB} (256 bytes + 3 specials), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Seeding all 256 bytes guarantees every text is encodable, not just the bytes seen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return BPETokenizer(hf)


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Build a tokenizer of `kind` ("char" or "bpe") from `texts`; `vocab_size` is used by "bpe" only."""
    if kind == "char":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return CharTokenizer(chars)
    if kind == "bpe":
        return train_bpe(texts, vocab_size)
    raise UserError(f"unknown tokenizer kind {kind!r}; expected 'char' or 'bpe'")


def load_tokenizer(directory: Path) -> Tokenizer:
    """Load a tokenizer written by `Tokenizer.save`; UserError if the files are missing, corrupt or inconsistent."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        content = (directory / TOKENIZER_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no tokenizer in {directory} (expected {TOKENIZER_FILE} and {META_FILE})") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read tokenizer in {directory}: {err}") from None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind not in ("char", "bpe"):
        raise UserError(f"tokenizer in {directory} has unknown kind {kind!r}")
    try:
        if kind == "char":
            tokenizer: Tokenizer = CharTokenizer(json.loads(content)["chars"])
        else:
            tokenizer = BPETokenizer(HFTokenizer.from_str(content))
    except Exception as err:  # malformed JSON, missing keys, or the Rust tokenizer's plain Exception
        detail = " ".join(str(err).split())  # UserError messages stay on one line
        raise UserError(f"corrupt {TOKENIZER_FILE} in {directory}: {type(err).__name__}: {detail}") from None
    if tokenizer.fingerprint() != meta.get("fingerprint"):
        raise UserError(f"corrupt tokenizer in {directory}: fingerprint does not match {META_FILE}")
    return tokenizer
