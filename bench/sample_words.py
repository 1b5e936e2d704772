"""How word-like are a checkpoint's samples: the share of their words that occur in the training text.

    python bench/sample_words.py SAMPLES.json --checkpoint runs/demo

SAMPLES.json is what `loopdlm sample --out FILE` writes ({"prompts": [...], "samples": [...]}; each sample starts
with its prompt, which is not counted). A word is a run of 3 or more ASCII letters, compared case-insensitively with
the words of the checkpoint's training split (the validation split is held out, so it does not count as a source).
Prints the per-sample and overall share and returns it; `--min-share` turns the figure into a pass/fail exit code.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

WORD = re.compile(r"[A-Za-z]{3,}")


def words(text: str) -> list[str]:
    """Lower-cased runs of 3+ ASCII letters, in order."""
    return [w.lower() for w in WORD.findall(text)]


def continuation(sample: str, prompt: str) -> str:
    """The generated part of a sample whose text starts with its prompt (the whole sample otherwise)."""
    return sample[len(prompt):] if prompt and sample.startswith(prompt) else sample


def corpus_vocabulary(checkpoint: str) -> set[str]:
    """Every word of the training split of the corpus `checkpoint` was trained on."""
    from loopdlm.workflow import checkpoint_corpus_split, load_pretrained

    loaded = load_pretrained(checkpoint, "cpu")
    split = checkpoint_corpus_split(loaded.config.data, loaded.tokenizer, "train")
    chunk = 1 << 16
    vocabulary: set[str] = set()
    rows = split.num_sequences
    import torch

    for start in range(0, rows, chunk // split.seq_len):
        index = torch.arange(start, min(rows, start + chunk // split.seq_len))
        vocabulary.update(words(loaded.tokenizer.decode(split.get(index).flatten().tolist())))
    return vocabulary


def word_share(samples: list[str], prompts: list[str], vocabulary: set[str]) -> tuple[float, list[tuple[int, int]]]:
    """(overall share of sample words found in `vocabulary`, per sample (found, total))."""
    counts = []
    for index, sample in enumerate(samples):
        prompt = prompts[index] if index < len(prompts) else ""
        found = words(continuation(sample, prompt))
        counts.append((sum(w in vocabulary for w in found), len(found)))
    total = sum(n for _, n in counts)
    return (sum(k for k, _ in counts) / total if total else 0.0), counts


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="JSON written by `loopdlm sample --out`")
    parser.add_argument("--checkpoint", required=True, help="the run folder the samples came from")
    parser.add_argument("--min-share", type=float, default=None, help="exit 1 when the share is below this")
    args = parser.parse_args(argv)
    record = json.loads(Path(args.samples).read_text(encoding="utf-8"))
    share, counts = word_share(record["samples"], record.get("prompts", []), corpus_vocabulary(args.checkpoint))
    for index, (found, total) in enumerate(counts):
        print(f"sample {index}: {found}/{total} words of 3+ letters are words of the training text")
    print(f"real-word share: {share:.1%} of {sum(n for _, n in counts)} words")
    if args.min_share is not None and share < args.min_share:
        sys.exit(1)
    return share


if __name__ == "__main__":
    main()
