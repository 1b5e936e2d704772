"""`loopdlm prepare`: tokenise a named source into a cached memmap corpus."""

from __future__ import annotations

from loopdlm.commands.arguments import spec_type
from loopdlm.config import DataConfig
from loopdlm.settings import field_help
from loopdlm.workflow import prepare_data


def register(subparsers) -> None:
    parser = subparsers.add_parser("prepare", help="tokenise a corpus (shakespeare, text:PATH, jsonl:PATH:FIELD)")
    parser.add_argument("source", help="shakespeare | text:PATH | jsonl:PATH:FIELD")
    parser.add_argument("--tokenizer", choices=["char", "bpe"], default="char",
                        help=field_help(DataConfig, "tokenizer"))
    parser.add_argument("--vocab-size", type=spec_type(DataConfig, "vocab_size", int), default=4096,
                        help=field_help(DataConfig, "vocab_size"))
    parser.add_argument("--val-fraction", type=spec_type(DataConfig, "val_fraction", float), default=0.05,
                        help=field_help(DataConfig, "val_fraction"))
    parser.add_argument("--cache-dir", default="data_cache", help=field_help(DataConfig, "cache_dir"))
    parser.set_defaults(func=run)


def run(args) -> None:
    data = DataConfig(source=args.source, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                      val_fraction=args.val_fraction, cache_dir=args.cache_dir)
    prepared = prepare_data(data)
    m = prepared.manifest
    print(f"prepared {args.source}: {plural(m.num_documents, 'document')}, {plural(m.num_tokens, 'token')} "
          f"({m.val_start} train / {m.num_tokens - m.val_start} val), vocabulary {m.vocab_size} -> "
          f"{prepared.directory}")


def plural(count: int, noun: str) -> str:
    """'1 document', '2 documents'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
