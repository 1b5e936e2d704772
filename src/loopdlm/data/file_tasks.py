"""Tasks read from the user's files: prompt/answer pairs from jsonl (GSM8K is one) and lists of sudoku puzzles.

A file task holds every example of its file. `task_source.task_examples` takes a split of them by prompt hash (or
the whole file with split 'all'). Rows are sized in tokens of the tokenizer they are encoded with (`row_widths`),
and a character that tokenizer cannot encode is reported with its file line. Every problem with a file (missing,
not UTF-8, empty, a malformed line, a missing field, a wrong grid) is a one-line UserError naming file and line.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path

from loopdlm.data.tasks import Example, Task, TokenizerLike, extract_answer, verify_sudoku
from loopdlm.errors import UserError

#: Grid side for each accepted puzzle length (4x4 and 9x9 sudoku).
SUDOKU_SIZES = {16: 4, 81: 9}


def read_task_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for every non-blank line of a UTF-8 file (a BOM is skipped).

    Raises:
        UserError: the file is missing, unreadable or not UTF-8.
    """
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {error.start})") from None
    except OSError as error:
        raise UserError(f"cannot read task file {path}: {error.strerror}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


class FileTask(Task):
    """A task whose examples are the lines of a file.

    Attributes:
        path: the file.
        examples: every example in file order; lines: the file line of each.
        prompt_length / answer_length: the longest prompt / answer in characters (the widths for a char tokenizer).
    """

    path: Path
    examples: list[Example]
    lines: list[int]

    def _set_examples(self, examples: list[Example], lines: list[int]) -> None:
        if not examples:
            raise UserError(f"task file has no examples: {self.path}")
        self.examples, self.lines = examples, lines
        self.prompt_length = max(len(e.prompt) for e in examples)
        self.answer_length = max(len(e.answer) for e in examples)
        self._widths: dict[int, tuple[TokenizerLike, tuple[int, int]]] = {}

    def alphabet(self) -> str:
        """Every character of the file's prompts and answers."""
        return "".join(sorted({ch for e in self.examples for ch in e.prompt + e.answer}))

    def generate(self, n: int | None, seed: int) -> list[Example]:
        """`n` examples sampled without replacement (deterministic in `seed`); all, in file order, if `n` is None."""
        if n is None:
            return list(self.examples)
        if n > len(self.examples):
            raise UserError(f"asked for {n} {self.name} examples but {self.path} has {len(self.examples)}")
        return random.Random(seed).sample(self.examples, n)

    def row_widths(self, tokenizer: TokenizerLike) -> tuple[int, int]:
        """(P, A): the longest prompt and answer of the file in `tokenizer`'s tokens (computed once per tokenizer).

        Raises:
            UserError: a line holds a character `tokenizer` cannot encode (e.g. outside a char vocabulary).
        """
        known = self._widths.get(id(tokenizer))
        if known is not None:
            return known[1]
        prompt_width = answer_width = 0
        for example, line in zip(self.examples, self.lines):
            try:
                prompt_width = max(prompt_width, len(tokenizer.encode(example.prompt)))
                answer_width = max(answer_width, len(tokenizer.encode(example.answer)))
            except UserError as error:
                raise UserError(f"{self.path}:{line}: {error}") from None
        # The tokenizer is kept beside its widths so its id cannot be reused by another object.
        self._widths[id(tokenizer)] = (tokenizer, (prompt_width, answer_width))
        return prompt_width, answer_width


class JsonlTask(FileTask):
    """Prompt/answer pairs from a jsonl file, one JSON object per line, with string fields `prompt_field` and
    `answer_field`.

    verify: 'exact' (the stripped prediction equals a stripped reference answer of that prompt), 'number' (the
    number `extract_answer` finds in the prediction equals the reference's: the first number after '####', else
    the last one) or 'sudoku' (prompts are 16- or 81-character grids, '0' or '.' for blanks; a prediction is right
    when it is a valid grid that keeps the givens). Rejected at load: a reference answer its own verifier would not
    accept (no number for 'number', not a solution for 'sudoku').
    """

    VERIFIERS = ("exact", "number", "sudoku")

    def __init__(self, path: str | Path, prompt_field: str = "prompt", answer_field: str = "answer",
                 verify: str = "exact", name: str = "jsonl") -> None:
        if verify not in self.VERIFIERS:
            raise UserError(f"unknown verify mode {verify!r}; choose one of {', '.join(self.VERIFIERS)}")
        self.path, self.name, self.verify_mode = Path(path), name, verify
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.sudoku_size: int | None = None
        examples, lines = [], []
        for line_number, line in read_task_lines(self.path):
            where = f"{self.path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{where}: invalid JSON ({error.msg})") from None
            if not (isinstance(row, dict) and isinstance(row.get(prompt_field), str)
                    and isinstance(row.get(answer_field), str)):
                raise UserError(f"{where}: expected an object with string fields {prompt_field!r} and "
                                f"{answer_field!r}")
            examples.append(self._checked(Example(row[prompt_field], row[answer_field]), where))
            lines.append(line_number)
        self._set_examples(examples, lines)
        self._references: dict[str, set[str]] = {}
        for example in self.examples:
            self._references.setdefault(example.prompt, set()).add(self._reference_key(example.answer))

    def _checked(self, example: Example, where: str) -> Example:
        """The example with a sudoku prompt normalised to '0' blanks; UserError when its answer fails its verifier."""
        if self.verify_mode == "number" and extract_answer(example.answer) is None:
            raise UserError(f"{where}: answer has no number to compare (verify=number)")
        if self.verify_mode == "sudoku":
            puzzle, size = parse_sudoku_grid(example.prompt, where)
            if self.sudoku_size not in (None, size):
                raise UserError(f"{where}: a {size}x{size} puzzle in a file of {self.sudoku_size}x"
                                f"{self.sudoku_size} puzzles")
            self.sudoku_size = size
            if not verify_sudoku(size, puzzle, example.answer):
                raise UserError(f"{where}: the answer is not a solution of the puzzle")
            return Example(puzzle, example.answer.strip())
        return example

    def _reference_key(self, answer: str) -> str:
        return extract_answer(answer) if self.verify_mode == "number" else answer.strip()

    def verify(self, example_prompt: str, predicted_answer: str) -> bool:
        """True when the prediction is right for this prompt under the task's verify mode (see the class)."""
        if self.verify_mode == "sudoku":
            return verify_sudoku(self.sudoku_size, example_prompt, predicted_answer)
        references = self._references.get(example_prompt)
        if references is None:
            raise UserError(f"prompt not in {self.path}: {example_prompt[:80]!r}")
        predicted = extract_answer(predicted_answer) if self.verify_mode == "number" else predicted_answer.strip()
        return predicted is not None and predicted in references


class GSM8KTask(JsonlTask):
    """Grade-school math word problems from a `{"question", "answer"}` jsonl file (the GSM8K format).

    Prompt: the question. Gold answer: the full worked solution ending in '#### <number>'. A prediction may be a
    whole solution or just the number: `verify` compares extracted numbers (verify mode 'number').
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "question", "answer", verify="number", name="gsm8k")


def parse_sudoku_grid(text: str, where: str) -> tuple[str, int]:
    """(puzzle with '0' blanks, side 4 or 9) from a 16- or 81-character grid using '0' or '.' for blanks.

    Raises:
        UserError: wrong length or a character that is not a digit of that grid (message starts with `where`).
    """
    size = SUDOKU_SIZES.get(len(text))
    if size is None:
        raise UserError(f"{where}: expected a sudoku grid of 16 or 81 characters, got {len(text)}")
    grid = text.replace(".", "0")
    bad = next((ch for ch in grid if not ("0" <= ch <= str(size))), None)
    if bad is not None:
        raise UserError(f"{where}: {bad!r} is not a cell of a {size}x{size} sudoku (digits 1-{size}, '0' or '.')")
    return grid, size


class SudokuFileTask(FileTask):
    """Sudoku puzzles from a file, checked by the sudoku verifier (a valid grid that keeps the givens).

    One puzzle per line as a 16- or 81-character string with '0' or '.' for blanks, optionally followed by
    whitespace and its solution; or a CSV whose header names the columns `puzzle` and (optionally) `solution`.
    Every puzzle of a file has the same size. A given solution must solve its puzzle. Puzzles without a solution
    have the answer "" (fine for evaluation, which needs no reference; `finetune` refuses them).
    """

    name = "sudoku"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.size: int | None = None
        examples, lines = [], []
        for line_number, puzzle, solution in self._records():
            where = f"{self.path}:{line_number}"
            grid, size = parse_sudoku_grid(puzzle, where)
            if self.size not in (None, size):
                raise UserError(f"{where}: a {size}x{size} puzzle in a file of {self.size}x{self.size} puzzles")
            self.size = size
            if solution and not verify_sudoku(size, grid, solution):
                raise UserError(f"{where}: the solution does not solve the puzzle")
            examples.append(Example(grid, solution))
            lines.append(line_number)
        self._set_examples(examples, lines)
        self.answer_length = self.prompt_length

    def _records(self) -> Iterator[tuple[int, str, str]]:
        """(line number, puzzle, solution or "") per puzzle, from either file form."""
        lines = list(read_task_lines(self.path))
        header = [cell.strip().lower() for cell in lines[0][1].split(",")] if lines else []
        if "puzzle" in header:
            if any(column not in ("puzzle", "solution") for column in header):
                raise UserError(f"{self.path}:{lines[0][0]}: CSV columns must be puzzle[,solution], got "
                                f"{lines[0][1].strip()!r}")
            for (line_number, _), cells in zip(lines[1:], csv.reader(line for _, line in lines[1:])):
                if len(cells) != len(header):
                    raise UserError(f"{self.path}:{line_number}: expected {len(header)} CSV fields, got {len(cells)}")
                row = dict(zip(header, (cell.strip() for cell in cells)))
                yield line_number, row["puzzle"], row.get("solution", "")
            return
        for line_number, line in lines:
            fields = line.split()
            if len(fields) > 2:
                raise UserError(f"{self.path}:{line_number}: expected a puzzle and optionally its solution, got "
                                f"{len(fields)} fields")
            yield line_number, fields[0], fields[1] if len(fields) == 2 else ""

    def verify(self, example_prompt: str, predicted_answer: str) -> bool:
        """True when the prediction is a full valid grid that keeps every given cell of the prompt."""
        return verify_sudoku(self.size, example_prompt, predicted_answer)

    def row_widths(self, tokenizer: TokenizerLike) -> tuple[int, int]:
        """(P, cells): the answer slot fits a full grid also when the file gives no solutions (a tokenizer never
        needs more than one token per ASCII digit)."""
        return super().row_widths(tokenizer)[0], self.size * self.size

    def alphabet(self) -> str:
        """Digits '0' (blank) to str(size), whatever the file happens to contain."""
        return "".join(str(d) for d in range(self.size + 1))


__all__ = ["FileTask", "GSM8KTask", "JsonlTask", "SudokuFileTask", "parse_sudoku_grid", "read_task_lines"]
