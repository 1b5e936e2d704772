"""`loopdlm prepare`: tokenise a named source into a cached memmap corpus."""

from __future__ import annotations

from loopdlm.config import DataConfig
from loopdlm.workflow import prepare_data


def register(subparsers) -> None:
    parser = subparsers.add_parser("prepare", help="tokenise a corpus (shakespeare, text:PATH, jsonl:PATH:FIELD)")
    parser.add_argument("source", help="shakespeare | text:PATH | jsonl:PATH:FIELD")
    parser.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--cache-dir", default="data_cache")
    parser.set_defaults(func=run)


def run(args) -> None:
    data = DataConfig(source=args.source, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                      val_fraction=args.val_fraction, cache_dir=args.cache_dir)
    prepared = prepare_data(data)
    m = prepared.manifest
    print(f"prepared {args.source}: {m.num_documents} documents, {m.num_tokens} tokens "
          f"({m.val_start} train / {m.num_tokens - m.val_start} val), vocabulary {m.vocab_size} -> {prepared.directory}")
