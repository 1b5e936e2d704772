"""Tests for loopdlm.data.tasks: generators, verifiers, GSM8K loading/extraction, the registry and row encoding."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from loopdlm.data.file_tasks import GSM8KTask
from loopdlm.data.task_spec import get_task
from loopdlm.data.tasks import (
    AdditionTask,
    Example,
    MultiplicationTask,
    SudokuTask,
    TaskBatch,
    decode_answers,
    encode_examples,
    extract_answer,
)
from loopdlm.errors import UserError

GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")


class FakeCharTokenizer:
    """One id per character after three specials, enough to exercise row layout without the real tokenizer."""

    pad_id, mask_id, eos_id = 0, 1, 2

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet
        self.vocab_size = 3 + len(alphabet)

    def encode(self, text: str) -> list[int]:
        return [3 + self.alphabet.index(ch) for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


def corrupt_one_digit(text: str, position: int) -> str:
    """Change the digit at `position` to a different digit."""
    old = text[position]
    new = "1" if old != "1" else "2"
    return text[:position] + new + text[position + 1:]


# --- sudoku ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,givens", [(4, 4), (4, 8), (9, 30)])
def test_sudoku_gold_answers_verify_and_givens_are_exact(size, givens):
    task = SudokuTask(size, givens)
    for example in task.generate(20, seed=3):
        assert len(example.prompt) == len(example.answer) == size * size
        assert sum(ch != "0" for ch in example.prompt) == givens
        assert all(p in ("0", a) for p, a in zip(example.prompt, example.answer))
        assert task.verify(example.prompt, example.answer)


def test_sudoku_verifier_rejects_one_changed_digit_anywhere():
    task = SudokuTask(9, 30)
    example = task.generate(1, seed=0)[0]
    blank = example.prompt.index("0")
    given = next(i for i, ch in enumerate(example.prompt) if ch != "0")
    assert not task.verify(example.prompt, corrupt_one_digit(example.answer, blank))
    assert not task.verify(example.prompt, corrupt_one_digit(example.answer, given))


def test_sudoku_verifier_accepts_a_different_valid_completion_and_rejects_a_grid_ignoring_givens():
    # Relabelling digits of a valid grid keeps it valid; with no givens it must be accepted, with givens rejected.
    task = SudokuTask(4, 6)
    example = task.generate(1, seed=1)[0]
    relabelled = example.answer.translate(str.maketrans("1234", "2341"))
    assert task.verify("0" * 16, relabelled)
    assert not task.verify(example.prompt, relabelled)


def test_sudoku_verifier_rejects_malformed_predictions():
    task = SudokuTask(4, 6)
    example = task.generate(1, seed=2)[0]
    assert not task.verify(example.prompt, example.answer[:-1])
    assert not task.verify(example.prompt, example.answer[:-1] + "5")
    assert not task.verify(example.prompt, example.answer[:-1] + "0")
    latin_square_with_bad_boxes = "1234" "2341" "3412" "4123"
    assert not task.verify("0" * 16, latin_square_with_bad_boxes)
    with pytest.raises(UserError):
        task.verify("123", example.answer)


def all_4x4_sudoku_grids() -> list[str]:
    """Every valid 4x4 grid (there are 288), by brute force independent of the task's solver."""
    rows = ["".join(p) for p in itertools.permutations("1234")]

    def compatible(above: list[str], row: str) -> bool:
        columns_ok = all(row[c] not in {r[c] for r in above} for c in range(4))
        box_partner = above[-1] if len(above) % 2 == 1 else None  # rows 0-1 and 2-3 share boxes
        boxes_ok = box_partner is None or all(
            set(row[c:c + 2]).isdisjoint(box_partner[c:c + 2]) for c in (0, 2))
        return columns_ok and boxes_ok

    grids = [[]]
    for _ in range(4):
        grids = [grid + [row] for grid in grids for row in rows if compatible(grid, row)]
    return ["".join(grid) for grid in grids]


def test_sudoku4_puzzles_have_a_unique_solution_and_verifier_matches_brute_force():
    grids = all_4x4_sudoku_grids()
    assert len(grids) == 288
    task = SudokuTask(4, 4)
    assert all(task.verify("0" * 16, grid) for grid in grids)
    for example in task.generate(30, seed=5):
        completions = [g for g in grids if all(p in ("0", ch) for p, ch in zip(example.prompt, g))]
        assert completions == [example.answer]


def test_generate_is_deterministic_by_seed():
    for task in (SudokuTask(9, 30), AdditionTask(3), MultiplicationTask(2)):
        assert task.generate(5, seed=7) == task.generate(5, seed=7)
        assert task.generate(5, seed=7) != task.generate(5, seed=8)


def test_sudoku_rejects_bad_size_and_givens():
    with pytest.raises(UserError):
        SudokuTask(5, 10)
    with pytest.raises(UserError):
        SudokuTask(9, 16)
    with pytest.raises(UserError):
        SudokuTask(4, 17)


def test_sudoku_without_uniqueness_reaches_low_givens():
    task = SudokuTask(9, 10, unique=False)
    for example in task.generate(3, seed=0):
        assert sum(ch != "0" for ch in example.prompt) == 10
        assert task.verify(example.prompt, example.answer)


# --- arithmetic ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task_class,op", [
    (AdditionTask, lambda a, b: a + b),
    (MultiplicationTask, lambda a, b: a * b),
])
def test_arithmetic_gold_answers_are_correct_and_one_digit_change_is_rejected(task_class, op):
    task = task_class(3)
    for example in task.generate(50, seed=11):
        a, b = map(int, example.prompt[:-1].split(task.symbol))
        assert example.answer == str(op(a, b))
        assert len(example.prompt) <= task.prompt_length and len(example.answer) <= task.answer_length
        assert task.verify(example.prompt, example.answer)
        assert not task.verify(example.prompt, corrupt_one_digit(example.answer, 0))
    assert set("".join(e.prompt + e.answer for e in task.generate(50, seed=0))) <= set(task.alphabet())


def test_arithmetic_answer_length_is_the_largest_result():
    assert AdditionTask(3).answer_length == 4  # 999 + 999 = 1998
    assert MultiplicationTask(2).answer_length == 4  # 99 * 99 = 9801
    assert MultiplicationTask(1).answer_length == 2


def test_reverse_answer_writes_least_significant_digit_first():
    task = AdditionTask(3, reverse_answer=True)
    assert task.verify("123+456=", "975")
    assert not task.verify("123+456=", "579")
    assert task.verify("100+0=", "001")
    for example in task.generate(20, seed=0):
        assert task.verify(example.prompt, example.answer)


def test_arithmetic_verifier_rejects_non_numbers_and_bad_prompts():
    task = AdditionTask(2)
    assert task.verify("12+30=", " 42 ")
    assert not task.verify("12+30=", "4 2")
    assert not task.verify("12+30=", "")
    with pytest.raises(UserError):
        task.verify("12*30=", "360")


# --- gsm8k -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("so 2+2=4\n#### 1,234", "1234"),
    ("#### 1,234.50", "1234.5"),
    ("#### $-3", "-3"),
    ("#### -$3", "-3"),
    ("#### +5", "5"),
    ("#### 7.0", "7"),
    ("#### 100", "100"),
    ("#### 0.50", "0.5"),
    ("#### -0", "0"),
    ("He pays $1,000 then 16-3-4 = 9 dollars.", "9"),
    ("The answer is 12.", "12"),
    ("I think it is -4", "-4"),
    ("5 apples\n#### ", "5"),
    ("no number at all", None),
    ("", None),
])
def test_extract_answer_normalises_numbers(text, expected):
    assert extract_answer(text) == expected


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_gsm8k_task_loads_samples_and_verifies(tmp_path):
    rows = [{"question": f"What is {i} times 1,000?", "answer": f"{i}*1000={i * 1000}\n#### {i * 1000:,}"}
            for i in range(1, 6)]
    task = GSM8KTask(write_jsonl(tmp_path / "train.jsonl", rows))
    assert task.generate(None, seed=0) == [Example(r["question"], r["answer"]) for r in rows]
    sample = task.generate(3, seed=1)
    assert sample == task.generate(3, seed=1) and len(set(sample)) == 3
    assert task.answer_length == max(len(r["answer"]) for r in rows)
    assert set(task.alphabet()) == set("".join(r["question"] + r["answer"] for r in rows))
    question = rows[2]["question"]
    assert task.verify(question, rows[2]["answer"])
    assert task.verify(question, "3,000")
    assert task.verify(question, "blah\n#### 3000.00")
    assert not task.verify(question, "#### 3001")
    assert not task.verify(question, "no idea")
    with pytest.raises(UserError):
        task.verify("unknown question", "1")
    with pytest.raises(UserError):
        task.generate(6, seed=0)


def test_gsm8k_bad_files_raise_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        GSM8KTask(tmp_path / "missing.jsonl")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": oops\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:3: invalid JSON") as error:
        GSM8KTask(bad_json)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=":1: expected"):
        GSM8KTask(write_jsonl(tmp_path / "keys.jsonl", [{"question": "q"}]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="no examples"):
        GSM8KTask(empty)


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="shared GSM8K copy not present")
def test_gsm8k_real_test_file_every_gold_answer_verifies():
    task = GSM8KTask(GSM8K_TEST)
    examples = task.generate(None, seed=0)
    assert len(examples) == 1319
    assert examples[0].prompt.startswith("Janet") and extract_answer(examples[0].answer) == "18"
    assert all(task.verify(e.prompt, e.answer) for e in examples)


# --- registry --------------------------------------------------------------------------------------------

def test_get_task_parses_specs(tmp_path):
    sudoku = get_task("sudoku9:givens=28")
    assert isinstance(sudoku, SudokuTask) and (sudoku.size, sudoku.givens, sudoku.unique) == (9, 28, True)
    assert (get_task("sudoku4").size, get_task("sudoku4:unique=false").unique) == (4, False)
    add = get_task("add:digits=5,reverse=true")
    assert isinstance(add, AdditionTask) and (add.digits, add.reverse_answer) == (5, True)
    mul = get_task("mul:digits=2")
    assert isinstance(mul, MultiplicationTask) and mul.digits == 2
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}])
    gsm = get_task(f"gsm8k:path={path}")
    assert isinstance(gsm, GSM8KTask) and gsm.path == path


@pytest.mark.parametrize("spec,message", [
    ("chess", "valid tasks: sudoku4, sudoku9, add, mul, gsm8k"),
    ("add:width=3", "valid options: digits=..., reverse=..."),
    ("add:digits", "bad option"),
    ("add:digits=three", "bad value 'three'"),
    ("sudoku4:unique=maybe", "bad value 'maybe'"),
    ("gsm8k", "needs a file"),
])
def test_get_task_rejects_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        get_task(spec)


# --- rows ------------------------------------------------------------------------------------------------

def test_encode_examples_layout():
    tokenizer = FakeCharTokenizer("0123456789+=")
    examples = [Example("1+2=", "3"), Example("12+34=", "46")]
    batch = encode_examples(examples, tokenizer, prompt_len=None, answer_len=4)
    assert isinstance(batch, TaskBatch)
    assert batch.tokens.dtype == torch.long and batch.prompt_mask.dtype == torch.bool
    assert batch.tokens.shape == batch.prompt_mask.shape == (2, 6 + 4)
    assert batch.answer_slice == slice(6, 10)
    pad, eos = tokenizer.pad_id, tokenizer.eos_id
    assert batch.tokens[0].tolist() == [pad, pad] + tokenizer.encode("1+2=") + tokenizer.encode("3") + [eos] * 3
    assert batch.tokens[1].tolist() == tokenizer.encode("12+34=") + tokenizer.encode("46") + [eos] * 2
    expected_mask = torch.tensor([[True] * 6 + [False] * 4] * 2)
    assert torch.equal(batch.prompt_mask, expected_mask)


def test_encode_examples_fixed_prompt_len_and_too_long_errors():
    tokenizer = FakeCharTokenizer("0123456789+=")
    batch = encode_examples([Example("1+2=", "3")], tokenizer, prompt_len=8, answer_len=1)
    assert batch.tokens.shape == (1, 9)
    assert batch.tokens[0, :4].tolist() == [tokenizer.pad_id] * 4 and batch.tokens[0, -1].item() != tokenizer.eos_id
    with pytest.raises(UserError, match="prompt has 6 tokens, more than prompt_len=5"):
        encode_examples([Example("12+34=", "46")], tokenizer, prompt_len=5, answer_len=4)
    with pytest.raises(UserError, match="answer has 2 tokens, more than answer_len=1"):
        encode_examples([Example("12+34=", "46")], tokenizer, prompt_len=None, answer_len=1)


def test_decode_answers_inverts_encode_examples():
    task = MultiplicationTask(2)
    tokenizer = FakeCharTokenizer(task.alphabet())
    examples = task.generate(16, seed=0)
    batch = encode_examples(examples, tokenizer, prompt_len=task.prompt_length, answer_len=task.answer_length)
    assert decode_answers(batch.tokens, tokenizer, batch.prompt_len) == [e.answer for e in examples]


def test_decode_answers_stops_at_first_eos():
    tokenizer = FakeCharTokenizer("abc")
    a, b, c = tokenizer.encode("abc")
    eos = tokenizer.eos_id
    tokens = torch.tensor([[a, b, eos, c], [a, c, b, a]])
    assert decode_answers(tokens, tokenizer, prompt_len=1) == ["b", "cba"]
