"""Task examples as training/evaluation data: disjoint splits, a char tokenizer, and rows whose answer region alone
is noised.

Splits are decided by a hash of the prompt (bucket 0 of 10 = test, 1 = val, 2-9 = train), so a test problem can
never appear in training, whatever seeds or example counts the two sides use, and nothing has to be recorded
beside a checkpoint to keep them apart.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

from torch import Tensor

from loopdlm.data.batches import TensorRows
from loopdlm.data.file_tasks import FileTask
from loopdlm.data.task_spec import get_task
from loopdlm.data.tasks import Example, Task, TaskBatch, TokenizerLike, encode_examples
from loopdlm.data.tokenizers import CharTokenizer
from loopdlm.errors import UserError

if TYPE_CHECKING:
    from loopdlm.config import DataConfig

SPLITS = ("train", "val", "test", "all")
_BUCKETS = 10
_SPLIT_BUCKETS = {"test": range(0, 1), "val": range(1, 2), "train": range(2, _BUCKETS)}
# A distinct-example search that finds nothing new in this many rounds has exhausted the split.
_STALE_ROUNDS = 4


def split_of(prompt: str) -> str:
    """The split ('train', 'val' or 'test') a prompt belongs to; a fixed function of the prompt text."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little") % _BUCKETS
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def task_examples(task: Task, n: int | None, seed: int, split: str = "train", unique: bool = False,
                  allow_fewer: bool = False) -> list[Example]:
    """`n` examples of `task` whose prompts fall in `split`; deterministic in (seed, split).

    Generated tasks are drawn in rounds from `task.generate` and filtered by `split_of`; a file task's examples are
    filtered from the whole file and shuffled (`n` None: all of them, in file order). With `unique`, no prompt
    repeats (use it for evaluation sets). 'all' skips the filter (a file that is a test set by itself).
    With `allow_fewer`, a split that runs out gives what it has instead of an error.

    Raises:
        UserError: unknown split, n < 1 (or None for a generated task), or a split too small to give n (distinct)
            examples (without allow_fewer).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n is None and not isinstance(task, FileTask):
        raise UserError(f"task {task.name} generates its problems; say how many")
    if n is not None and n < 1:
        raise UserError(f"need at least one example, got n={n}")

    def keep(example: Example) -> bool:
        return split == "all" or split_of(example.prompt) == split

    if isinstance(task, FileTask):
        pool = [e for e in task.examples if keep(e)]
        if unique:
            pool = list({e.prompt: e for e in pool}.values())
        if not pool:
            raise UserError(f"{task.path} has no examples in split {split!r}; try --split all")
        if n is None:
            return pool
        if len(pool) < n and not allow_fewer:
            raise UserError(f"{task.path} has {len(pool)} examples in split {split!r}, fewer than {n}")
        return random.Random(seed).sample(pool, min(n, len(pool)))

    chosen: list[Example] = []
    seen: set[str] = set()
    stale = 0
    chunk = max(n, 64)
    for round_index in range(10_000):
        fresh = 0
        for example in task.generate(chunk, _round_seed(seed, split, round_index)):
            if not keep(example) or (unique and example.prompt in seen):
                continue
            seen.add(example.prompt)
            chosen.append(example)
            fresh += 1
            if len(chosen) == n:
                return chosen
        stale = stale + 1 if fresh == 0 else 0
        if stale >= _STALE_ROUNDS:
            break
    if allow_fewer and chosen:
        return chosen
    raise UserError(f"task {task.name} gave only {len(chosen)} {'distinct ' if unique else ''}examples in split "
                    f"{split!r}, fewer than {n}; ask for fewer")


def _round_seed(seed: int, split: str, round_index: int) -> int:
    digest = hashlib.sha256(f"task-examples/{seed}/{split}/{round_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def task_tokenizer(task: Task) -> CharTokenizer:
    """A char tokenizer over the task's alphabet (ids 0-2 are mask, pad, eos)."""
    return CharTokenizer(task.alphabet())


def task_of(data: DataConfig) -> Task | None:
    """The task a run trained on (`data.task`, as `finetune` records it), or None for a corpus run."""
    return get_task(data.task) if data.task else None


def encode_task(task: Task, examples: list[Example], tokenizer: TokenizerLike) -> TaskBatch:
    """Rows `[left-padded prompt | answer + eos fill]` with the task's widths under `tokenizer`
    (`Task.row_widths`), so every batch of one task has the same layout. tokens LongTensor [N, P + A] on CPU."""
    return encode_examples(examples, tokenizer, *task.row_widths(tokenizer))


def task_nelbo_batches(task: Task, tokenizer: TokenizerLike, split: str, count: int, batch_size: int, seed: int
                       ) -> list[tuple[Tensor, Tensor]]:
    """Up to `count` distinct examples of `split` as (x0 int64 [B, P + A], noisable bool [B, P + A]) batches that
    noise and score the answer region only: what `finetune` validates on, for a likelihood bound."""
    rows = encode_task(task, task_examples(task, count, seed, split, unique=True, allow_fewer=True), tokenizer)
    noisable = ~rows.prompt_mask
    return [(rows.tokens[start:start + batch_size], noisable[start:start + batch_size])
            for start in range(0, rows.tokens.shape[0], batch_size)]


def task_rows(rows: TaskBatch) -> TensorRows:
    """Encoded task examples as the `Rows` of a `RowSource`: only the answer region is noisable, so the prompt is
    always visible and the loss scores the answer (and its eos fill) alone."""
    return TensorRows(rows.tokens, ~rows.prompt_mask)


def answer_canvas(rows: TaskBatch, mask_id: int) -> Tensor:
    """The rows with every answer column set to `mask_id`: what a sampler starts from. int64 [N, P + A]."""
    canvas = rows.tokens.clone()
    canvas[:, rows.answer_slice] = mask_id
    return canvas


__all__ = ["SPLITS", "answer_canvas", "encode_task", "split_of", "task_examples", "task_nelbo_batches", "task_of",
           "task_rows", "task_tokenizer"]
