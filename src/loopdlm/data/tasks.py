"""Verifiable reasoning tasks (generators + verifiers) and their conversion to fixed-width prompt -> answer rows.

A task makes `Example(prompt, answer)` pairs and checks a predicted answer against the prompt alone (sudoku rules,
recomputed arithmetic, the GSM8K reference number), so accuracy never depends on matching one gold string.
`encode_examples` lays examples out as `[left-padded prompt | answer + eos fill]` so every row's answer starts at
the same column; `decode_answers` reads that region back. Tasks read from the user's files live in `file_tasks`,
and `task_spec.get_task` builds any task from its spec string.
"""

from __future__ import annotations

import math
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Protocol

import torch

from loopdlm.errors import UserError


@dataclass(frozen=True)
class Example:
    """One task instance: the text the model sees and a correct answer (the training target)."""

    prompt: str
    answer: str


class Task(ABC):
    """A family of verifiable problems.

    Attributes:
        name: registry name ("sudoku9", "add", ...).
        prompt_length: the most characters a prompt can have.
        answer_length: the most characters an answer can have (size of a fixed answer slot for a char tokenizer).
    """

    name: str
    prompt_length: int
    answer_length: int

    @abstractmethod
    def generate(self, n: int, seed: int) -> list[Example]:
        """Return `n` examples; the same `seed` always gives the same list."""

    @abstractmethod
    def verify(self, example_prompt: str, predicted_answer: str) -> bool:
        """True when `predicted_answer` is a correct answer to `example_prompt` (checked from the prompt itself)."""

    @abstractmethod
    def alphabet(self) -> str:
        """Every character that can appear in a prompt or an answer, sorted, without repeats."""

    def row_widths(self, tokenizer: TokenizerLike) -> tuple[int, int]:
        """(P, A): the prompt and answer columns of this task's rows when encoded with `tokenizer`.

        Generated tasks have fixed widths in characters, which a char tokenizer (one id per character) keeps;
        file-backed tasks measure their examples in `tokenizer`'s tokens.
        """
        return self.prompt_length, self.answer_length


# ----------------------------------------------------------------------------------------------------------------
# Sudoku
# ----------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _popcounts(size: int) -> tuple[int, ...]:
    """Number of set bits of every candidate mask of `size` digits (digit d is bit d - 1)."""
    return tuple(bin(mask).count("1") for mask in range(1 << size))


@lru_cache(maxsize=None)
def _peers(size: int) -> tuple[tuple[int, ...], ...]:
    """For each cell index, the other cells sharing its row, column or box."""
    box = math.isqrt(size)

    def unit_of(cell: int) -> tuple[int, int, int]:
        row, col = divmod(cell, size)
        return row, col, (row // box) * box + col // box

    peers = []
    for cell in range(size * size):
        row, col, blk = unit_of(cell)
        peers.append(tuple(
            other for other in range(size * size)
            if other != cell and any(a == b for a, b in zip(unit_of(other), (row, col, blk)))
        ))
    return tuple(peers)


def _search_solutions(grid: list[int], size: int, limit: int,
                      rng: random.Random | None = None) -> tuple[int, list[int] | None]:
    """Count completions of `grid` (0 = blank), stopping at `limit`; also return the first one found.

    Depth-first search on bitmasks, always branching on the blank with the fewest candidates (which makes
    near-unique 9x9 puzzles take milliseconds in pure Python). With `rng`, candidates are tried in random order,
    which turns the search into a random full-grid generator when started from an empty grid.
    """
    box = math.isqrt(size)
    full = (1 << size) - 1
    popcount = _popcounts(size)
    rows, cols, boxes = [0] * size, [0] * size, [0] * size
    blanks: list[tuple[int, int, int, int]] = []
    for cell, value in enumerate(grid):
        row, col = divmod(cell, size)
        blk = (row // box) * box + col // box
        if value == 0:
            blanks.append((cell, row, col, blk))
            continue
        bit = 1 << (value - 1)
        if (rows[row] | cols[col] | boxes[blk]) & bit:
            return 0, None
        rows[row] |= bit
        cols[col] |= bit
        boxes[blk] |= bit

    solution = list(grid)
    first: list[list[int]] = []

    def search(depth: int) -> int:
        if depth == len(blanks):
            if not first:
                first.append(list(solution))
            return 1
        best, best_count, best_mask = depth, size + 1, 0
        for j in range(depth, len(blanks)):
            _, row, col, blk = blanks[j]
            mask = full & ~(rows[row] | cols[col] | boxes[blk])
            if popcount[mask] < best_count:
                best, best_count, best_mask = j, popcount[mask], mask
                if best_count <= 1:
                    break
        if best_count == 0:
            return 0
        # Only the set blanks[depth:] matters to deeper levels, so a swap (without undo) keeps the search exact.
        blanks[depth], blanks[best] = blanks[best], blanks[depth]
        cell, row, col, blk = blanks[depth]
        bits = [1 << d for d in range(size) if best_mask >> d & 1]
        if rng is not None:
            rng.shuffle(bits)
        found = 0
        for bit in bits:
            rows[row] |= bit
            cols[col] |= bit
            boxes[blk] |= bit
            solution[cell] = bit.bit_length()
            found += search(depth + 1)
            rows[row] ^= bit
            cols[col] ^= bit
            boxes[blk] ^= bit
            if found >= limit:
                break
        solution[cell] = 0
        return found

    count = search(0)
    return count, (first[0] if first else None)


class SudokuTask(Task):
    """Complete a size x size sudoku (size 4 or 9); difficulty is the number of given cells.

    Prompt: the puzzle row-major, one char per cell, '0' for a blank (81 chars for 9x9). Answer: the solved grid in
    the same layout. Full grids come from a randomised backtracking fill; cells are then removed in random order,
    and with `unique=True` a removal is kept only if the puzzle still has exactly one solution (a removed cell whose
    value is forced by its peers is kept without a solve). When greedy removal stalls above `givens`, a fresh grid
    is tried. Cost for 9x9 on one CPU core: about 8 ms a puzzle at 30 givens, 45 ms at 24; 22 or fewer usually
    stalls every attempt and raises UserError, where `unique=False` still gives puzzles (possibly with several
    solutions; the verifier accepts any valid completion). Grids are diverse but not uniformly distributed.
    """

    _MAX_GRID_ATTEMPTS = 50
    _MIN_UNIQUE_GIVENS = {4: 4, 9: 17}

    def __init__(self, size: int = 9, givens: int = 30, unique: bool = True) -> None:
        if size not in self._MIN_UNIQUE_GIVENS:
            raise UserError(f"sudoku size must be 4 or 9, got {size}")
        low = self._MIN_UNIQUE_GIVENS[size] if unique else 0
        if not low <= givens <= size * size:
            raise UserError(f"sudoku{size} givens must be in [{low}, {size * size}], got {givens}")
        self.size = size
        self.givens = givens
        self.unique = unique
        self.name = f"sudoku{size}"
        self.prompt_length = size * size
        self.answer_length = size * size

    def alphabet(self) -> str:
        """Digits '0' (blank) to str(size)."""
        return "".join(str(d) for d in range(self.size + 1))

    def generate(self, n: int, seed: int) -> list[Example]:
        """`n` puzzles with exactly `givens` given cells each; deterministic in `seed`."""
        rng = random.Random(seed)
        examples = []
        for _ in range(n):
            puzzle, solution = self._make_puzzle(rng)
            examples.append(Example(_grid_to_text(puzzle), _grid_to_text(solution)))
        return examples

    def _make_puzzle(self, rng: random.Random) -> tuple[list[int], list[int]]:
        for _ in range(self._MAX_GRID_ATTEMPTS):
            _, solution = _search_solutions([0] * self.size ** 2, self.size, limit=1, rng=rng)
            puzzle = self._remove_cells(solution, rng)
            if puzzle is not None:
                return puzzle, solution
        raise UserError(f"could not make unique sudoku{self.size} puzzles with {self.givens} givens; "
                        f"use more givens or unique=false")

    def _remove_cells(self, solution: list[int], rng: random.Random) -> list[int] | None:
        """Blank cells of `solution` down to `givens` given cells, or None when uniqueness blocks every removal."""
        puzzle = list(solution)
        remaining = len(puzzle)
        peers = _peers(self.size)
        for cell in rng.sample(range(len(puzzle)), len(puzzle)):
            if remaining == self.givens:
                break
            value = puzzle[cell]
            puzzle[cell] = 0
            if self.unique and not self._forced(puzzle, peers[cell]):
                if _search_solutions(puzzle, self.size, limit=2)[0] != 1:
                    puzzle[cell] = value
                    continue
            remaining -= 1
        return puzzle if remaining == self.givens else None

    def _forced(self, puzzle: list[int], peers: tuple[int, ...]) -> bool:
        """True when the givens among a blank's peers rule out all digits but one, so blanking it kept uniqueness.

        The puzzle agrees with a full solution, so the one digit left is the cell's own value.
        """
        seen = {puzzle[p] for p in peers}
        seen.discard(0)
        return len(seen) == self.size - 1

    def verify(self, example_prompt: str, predicted_answer: str) -> bool:
        """True when the prediction is a full valid grid (rows, columns, boxes) that keeps every given cell."""
        return verify_sudoku(self.size, example_prompt, predicted_answer)


def verify_sudoku(size: int, puzzle: str, predicted_answer: str) -> bool:
    """True when `predicted_answer` (surrounding whitespace ignored) is a full valid size x size grid that keeps
    every given cell of `puzzle` (row-major digits, '0' = blank).

    Raises:
        UserError: `puzzle` is not a size x size grid of digits 0..size.
    """
    cells = size * size
    alphabet = "".join(str(d) for d in range(size + 1))
    if len(puzzle) != cells or any(ch not in alphabet for ch in puzzle):
        raise UserError(f"not a sudoku{size} prompt: {puzzle[:100]!r}")
    answer = predicted_answer.strip()
    if len(answer) != cells or any(ch not in alphabet[1:] for ch in answer):
        return False
    if any(given != "0" and given != ch for given, ch in zip(puzzle, answer)):
        return False
    return _search_solutions([int(ch) for ch in answer], size, limit=1)[0] == 1


def _grid_to_text(grid: list[int]) -> str:
    return "".join(str(v) for v in grid)


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic
# ----------------------------------------------------------------------------------------------------------------

class _BinaryArithmeticTask(Task):
    """`a<op>b=` -> the result in decimal; operands uniform in [0, 10**digits).

    With `reverse_answer`, the answer is written least-significant digit first (e.g. 579 -> "975"), the order in
    which carries are computed, which models learn more easily.
    """

    symbol: str
    name: str

    def __init__(self, digits: int = 3, reverse_answer: bool = False) -> None:
        if digits < 1:
            raise UserError(f"{self.name} digits must be >= 1, got {digits}")
        self.digits = digits
        self.reverse_answer = reverse_answer
        self.prompt_length = 2 * digits + 2
        self.answer_length = len(str(self._apply(10 ** digits - 1, 10 ** digits - 1)))
        self._prompt_pattern = re.compile(rf"(\d+){re.escape(self.symbol)}(\d+)=")

    @staticmethod
    @abstractmethod
    def _apply(a: int, b: int) -> int:
        """The operation on two non-negative integers."""

    def alphabet(self) -> str:
        """Digits plus the operator and '='."""
        return "".join(sorted("0123456789=" + self.symbol))

    def generate(self, n: int, seed: int) -> list[Example]:
        """`n` random problems; deterministic in `seed`."""
        rng = random.Random(seed)
        examples = []
        for _ in range(n):
            a, b = rng.randrange(10 ** self.digits), rng.randrange(10 ** self.digits)
            examples.append(Example(f"{a}{self.symbol}{b}=", self._format(self._apply(a, b))))
        return examples

    def _format(self, value: int) -> str:
        text = str(value)
        return text[::-1] if self.reverse_answer else text

    def verify(self, example_prompt: str, predicted_answer: str) -> bool:
        """True when the prediction's digits (in this task's digit order) equal the recomputed result."""
        match = self._prompt_pattern.fullmatch(example_prompt)
        if match is None:
            raise UserError(f"not a {self.name} prompt: {example_prompt[:100]!r}")
        answer = predicted_answer.strip()
        if not answer.isdigit() or not answer.isascii():
            return False
        if self.reverse_answer:
            answer = answer[::-1]
        return int(answer) == self._apply(int(match.group(1)), int(match.group(2)))


class AdditionTask(_BinaryArithmeticTask):
    """`123+456=` -> `579`."""

    symbol = "+"
    name = "add"

    @staticmethod
    def _apply(a: int, b: int) -> int:
        return a + b


class MultiplicationTask(_BinaryArithmeticTask):
    """`12*34=` -> `408`."""

    symbol = "*"
    name = "mul"

    @staticmethod
    def _apply(a: int, b: int) -> int:
        return a * b


# ----------------------------------------------------------------------------------------------------------------
# Numeric answers (GSM8K and jsonl tasks with verify=number, see file_tasks)
# ----------------------------------------------------------------------------------------------------------------

# A number: optional sign (only when not glued to a preceding word/number, so "16-3" yields 16 and 3), digits with an
# optional fraction, or a bare fraction like ".5".
_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")


def _normalise_number(text: str) -> str | None:
    """'+1234.50' -> '1234.5', '7.0' -> '7', '-0' -> '0'; None if `text` is not a finite number."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution as a normalised number string, or None if there is no number.

    Takes the first number after the first '####'; without '####' (or with no number after it), the last number in
    the text. Thousands commas and '$' are dropped, a leading '+' is dropped, '-' is kept, and decimals lose trailing
    zeros: "#### $1,234.50" -> "1234.5", "#### $-3" -> "-3", "#### 7.0" -> "7".
    """
    cleaned = _THOUSANDS_COMMA.sub("", text).replace("$", "")
    head, marker, tail = cleaned.partition("####")
    if marker:
        after = _NUMBER.search(tail)
        if after is not None:
            return _normalise_number(after.group())
    numbers = _NUMBER.findall(cleaned)
    return _normalise_number(numbers[-1]) if numbers else None


# ----------------------------------------------------------------------------------------------------------------
# Rows for training and inference
# ----------------------------------------------------------------------------------------------------------------

class TokenizerLike(Protocol):
    """What `encode_examples` / `decode_answers` need from a tokenizer (CharTokenizer provides it)."""

    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class TaskBatch:
    """Fixed-width prompt -> answer rows.

    Attributes:
        tokens: LongTensor[N, P + A]; columns [0, P) hold the prompt left-padded with pad_id, columns [P, P + A) the
            answer followed by eos_id up to the end of the row.
        prompt_mask: BoolTensor[N, P + A]; True exactly on columns [0, P) (prompt and its left padding), which a
            diffusion objective never noises and never scores.
        prompt_len: P.
        answer_len: A.
    """

    tokens: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_len: int
    answer_len: int

    @property
    def answer_slice(self) -> slice:
        """Columns of the answer region: slice(P, P + A)."""
        return slice(self.prompt_len, self.prompt_len + self.answer_len)


def encode_examples(examples: list[Example], tokenizer: TokenizerLike, prompt_len: int | None,
                    answer_len: int) -> TaskBatch:
    """Lay examples out as `[pad..pad prompt | answer eos..eos]` rows of width prompt_len + answer_len.

    Left padding puts every answer at the same column P, so one prompt_mask and one answer slice serve the whole
    batch. Pad columns are in the prompt region: they are never noised nor scored and are identical for every
    prompt of a given length, so attending to them carries no information the model could misuse (a caller may
    still mask them out of attention with `tokens != pad_id`). The eos fill teaches the model to end its answer.
    An answer exactly answer_len tokens long has no eos.

    Args:
        examples: the rows to encode.
        tokenizer: provides encode, pad_id and eos_id.
        prompt_len: P; None uses the longest encoded prompt in `examples`.
        answer_len: A, tokens available for the answer and its eos fill.

    Returns:
        TaskBatch with tokens LongTensor[N, P + A] and prompt_mask BoolTensor[N, P + A] (on CPU).

    Raises:
        UserError: a prompt longer than prompt_len or an answer longer than answer_len.
    """
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    answers = [tokenizer.encode(e.answer) for e in examples]
    if prompt_len is None:
        prompt_len = max((len(p) for p in prompts), default=0)
    rows = []
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
        if len(prompt) > prompt_len:
            raise UserError(f"example {index}: prompt has {len(prompt)} tokens, more than prompt_len={prompt_len}")
        if len(answer) > answer_len:
            raise UserError(f"example {index}: answer has {len(answer)} tokens, more than answer_len={answer_len}")
        rows.append([tokenizer.pad_id] * (prompt_len - len(prompt)) + prompt
                    + answer + [tokenizer.eos_id] * (answer_len - len(answer)))
    tokens = torch.tensor(rows, dtype=torch.long).reshape(len(rows), prompt_len + answer_len)
    prompt_mask = torch.zeros(tokens.shape, dtype=torch.bool)
    prompt_mask[:, :prompt_len] = True
    return TaskBatch(tokens, prompt_mask, prompt_len, answer_len)


def decode_answers(tokens: torch.Tensor, tokenizer: TokenizerLike, prompt_len: int) -> list[str]:
    """Decode each row's answer region (columns prompt_len onward) up to, not including, its first eos_id.

    Args:
        tokens: LongTensor[N, P + A], e.g. TaskBatch.tokens or a sampler's output.
        tokenizer: provides decode and eos_id.
        prompt_len: P, the column where answers start.

    Returns:
        N strings.
    """
    answers = []
    for row in tokens[:, prompt_len:].tolist():
        end = row.index(tokenizer.eos_id) if tokenizer.eos_id in row else len(row)
        answers.append(tokenizer.decode(row[:end]))
    return answers
