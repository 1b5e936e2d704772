"""Tasks from the user's files (jsonl with each verify mode, sudoku lists and CSV), their one-line errors, and the
finetune -> eval-task / eval path on them."""

import json

import pytest

from loopdlm.cli import main
from loopdlm.data.file_tasks import JsonlTask, SudokuFileTask
from loopdlm.data.task_source import encode_task, task_examples, task_of, task_tokenizer
from loopdlm.data.task_spec import get_task, portable_spec
from loopdlm.data.tasks import SudokuTask
from loopdlm.data.tokenizers import CharTokenizer
from loopdlm.errors import UserError
from loopdlm.train.checkpoint_files import load_checkpoint_config

PUZZLE4 = "1200340000000000"
# Blanks filled by hand: rows 12|34, 34|12, 21|43, 43|21.
SOLUTION4 = "1234341221434321"
WRONG4 = "2134341221434321"  # first two cells swapped: breaks a given and a column


def sudoku_examples(size: int, n: int):
    return SudokuTask(size, givens=8 if size == 4 else 36, unique=False).generate(n, seed=0)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_jsonl(path, rows):
    return write_lines(path, [json.dumps(row) for row in rows])


# --- sudoku files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [4, 9])
def test_sudoku_file_with_solutions_whitespace_and_dot_blanks(tmp_path, size):
    examples = sudoku_examples(size, 5)
    lines = [f"{e.prompt.replace('0', '.')}   {e.answer}" for e in examples]
    task = get_task(f"sudoku:path={write_lines(tmp_path / 'p.txt', ['', *lines, ''])}")
    assert isinstance(task, SudokuFileTask) and task.size == size
    assert task.examples == examples  # '.' blanks become '0', blank lines are skipped
    assert task.lines == [2, 3, 4, 5, 6]
    assert all(task.verify(e.prompt, e.answer) for e in examples)
    assert not task.verify(examples[0].prompt, examples[1].answer) or examples[0].answer == examples[1].answer
    assert task.row_widths(task_tokenizer(task)) == (size * size, size * size)


def test_sudoku_file_without_solutions_and_csv_form(tmp_path):
    bare = SudokuFileTask(write_lines(tmp_path / "bare.txt", [PUZZLE4, PUZZLE4.replace("0", ".")]))
    assert [e.answer for e in bare.examples] == ["", ""] and bare.size == 4
    assert bare.verify(PUZZLE4, SOLUTION4) and not bare.verify(PUZZLE4, WRONG4)
    assert not bare.verify(PUZZLE4, "1234" * 4)  # keeps the givens but repeats digits in columns
    assert task_examples(bare, None, seed=0, split="all") == bare.examples
    csv_task = SudokuFileTask(write_lines(tmp_path / "p.csv", ["puzzle,solution", f"{PUZZLE4},{SOLUTION4}",
                                                               f'"{PUZZLE4}", {SOLUTION4}']))
    assert [(e.prompt, e.answer) for e in csv_task.examples] == [(PUZZLE4, SOLUTION4)] * 2
    assert csv_task.lines == [2, 3]
    only_puzzles = SudokuFileTask(write_lines(tmp_path / "q.csv", ["Puzzle", PUZZLE4]))
    assert only_puzzles.examples[0].answer == ""


# --- jsonl files -----------------------------------------------------------------------------------------

def test_jsonl_exact_verifier(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "capital of France?", "a": " Paris "}, {"q": "2+2?", "a": "4"},
                                             {"q": "2+2?", "a": "four"}])
    task = get_task(f"jsonl:path={path},prompt=q,answer=a")
    assert isinstance(task, JsonlTask) and task.verify_mode == "exact" and task.name == "jsonl"
    assert task.verify("capital of France?", "Paris\n") and not task.verify("capital of France?", "paris")
    assert task.verify("2+2?", "four") and task.verify("2+2?", "4") and not task.verify("2+2?", "4.0")
    with pytest.raises(UserError, match="prompt not in"):
        task.verify("unknown", "x")


def test_jsonl_number_verifier_compares_last_number(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "3 apples and 4 more?", "answer": "3 + 4 = 7 apples"},
                                             {"prompt": "half of 3?", "answer": "#### 1.50"}])
    task = get_task(f"jsonl:path={path},verify=number")
    assert task.verify("3 apples and 4 more?", "it is 7") and task.verify("3 apples and 4 more?", "7.0")
    assert not task.verify("3 apples and 4 more?", "7 or 8") and not task.verify("3 apples and 4 more?", "seven")
    assert task.verify("half of 3?", "1.5")


def test_jsonl_sudoku_verifier(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": PUZZLE4.replace("0", "."), "answer": SOLUTION4}])
    task = get_task(f"jsonl:path={path},verify=sudoku")
    assert task.examples[0].prompt == PUZZLE4 and task.sudoku_size == 4
    assert task.verify(PUZZLE4, SOLUTION4) and not task.verify(PUZZLE4, "1234" * 4)


def test_row_widths_are_tokens_of_the_tokenizer_and_unknown_characters_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ab", "answer": "c"}, {"prompt": "abcab", "answer": "zz"}])
    task = get_task(f"jsonl:path={path}")
    assert task.row_widths(CharTokenizer("abcz")) == (5, 2)
    rows = encode_task(task, task.examples, CharTokenizer("abcz"))
    assert rows.tokens.shape == (2, 7)
    with pytest.raises(UserError, match=r"t\.jsonl:2: character 'z' is not in"):
        task.row_widths(CharTokenizer("abc"))


def test_portable_spec_makes_the_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable_spec("jsonl:path=d/t.jsonl,prompt=q") == f"jsonl:path={tmp_path}/d/t.jsonl,prompt=q"
    assert portable_spec("add:digits=2") == "add:digits=2"


# --- bad files: one line, exit code 2 --------------------------------------------------------------------

def _bad_files(tmp_path):
    good = f"{PUZZLE4} {SOLUTION4}"
    (tmp_path / "latin1.txt").write_bytes(f"{PUZZLE4}\n# caf\xe9\n".encode("latin-1"))
    return [
        ("sudoku:path={}/missing.txt", "task file not found"),
        ("sudoku:path={}/latin1.txt", "not UTF-8 text"),
        (f"sudoku:path={write_lines(tmp_path / 'empty.txt', ['', '  '])}", "no examples"),
        (f"sudoku:path={write_lines(tmp_path / 'short.txt', [good, PUZZLE4[:15]])}", r"short\.txt:2: .*16 or 81"),
        (f"sudoku:path={write_lines(tmp_path / 'char.txt', ['1200340000x00000'])}", "'x' is not a cell"),
        (f"sudoku:path={write_lines(tmp_path / 'five.txt', ['1200340000500000'])}", "'5' is not a cell"),
        (f"sudoku:path={write_lines(tmp_path / 'wrong.txt', [f'{PUZZLE4} {WRONG4}'])}", "does not solve"),
        (f"sudoku:path={write_lines(tmp_path / 'mixed.txt', [good, '0' * 81])}", "9x9 puzzle in a file of 4x4"),
        (f"sudoku:path={write_lines(tmp_path / 'three.txt', [good + ' x'])}", "got 3 fields"),
        (f"sudoku:path={write_lines(tmp_path / 'cols.csv', ['puzzle,answer', good])}", "CSV columns"),
        (f"sudoku:path={write_lines(tmp_path / 'n.csv', ['puzzle,solution', PUZZLE4])}", "expected 2 CSV fields"),
        (f"jsonl:path={write_jsonl(tmp_path / 'f.jsonl', [{'prompt': 'p'}])}", r"f\.jsonl:1: expected .*'answer'"),
        (f"jsonl:path={write_lines(tmp_path / 'j.jsonl', ['{oops'])}", r"j\.jsonl:1: invalid JSON"),
        (f"jsonl:path={write_jsonl(tmp_path / 'n.jsonl', [{'prompt': 'p', 'answer': 'x'}])},verify=number",
         "no number"),
        (f"jsonl:path={write_jsonl(tmp_path / 's.jsonl', [{'prompt': 'p', 'answer': 'x'}])},verify=sudoku",
         "16 or 81"),
        (f"jsonl:path={tmp_path / 's.jsonl'},verify=regex", "unknown verify mode"),
        ("jsonl:prompt=q", "needs a file"),
        (f"jsonl:path={tmp_path / 's.jsonl'},field=q", "bad option"),
    ]


def test_every_bad_task_file_is_one_line_and_exit_code_2(tmp_path, capsys):
    for spec, message in _bad_files(tmp_path):
        spec = spec.format(tmp_path)
        with pytest.raises(UserError, match=message):
            get_task(spec)
        assert main(["finetune", "--task", spec, "--config", "sudoku4-tiny"]) == 2, spec
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("loopdlm finetune: error: "), err


# --- finetune / eval-task / eval on files ----------------------------------------------------------------

def _run_cli(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=3", "model.core_end=2", "model.max_loops=2",
        "train.batch_size=8", "train.steps=4", "train.eval_every=2", "train.eval_batches=1", "train.warmup_steps=1",
        "train.device=cpu", "train.log_every=1"]


@pytest.fixture(scope="module")
def sudoku_run(tmp_path_factory):
    """A sudoku4 model fine-tuned for 4 steps on a puzzle file with solutions."""
    folder = tmp_path_factory.mktemp("sudoku-file")
    examples = sudoku_examples(4, 300)
    train_file = write_lines(folder / "train.txt", [f"{e.prompt} {e.answer}" for e in examples])
    run = folder / "run"
    assert main(["finetune", "--task", f"sudoku:path={train_file}", "--config", "sudoku4-tiny", *TINY,
                 f"train.out_dir={run}"]) == 0
    return folder, run, examples


def test_finetune_on_a_sudoku_file_records_an_absolute_spec(sudoku_run):
    folder, run, examples = sudoku_run
    config = load_checkpoint_config(run)
    assert config.data.task == f"sudoku:path={folder / 'train.txt'}" and config.data.seq_len == 32
    assert isinstance(task_of(config.data), SudokuFileTask)


def test_eval_task_on_a_file_without_solutions_uses_the_whole_file_with_split_all(sudoku_run, tmp_path, capsys):
    folder, run, examples = sudoku_run
    bare = write_lines(tmp_path / "test.txt", [e.prompt.replace("0", ".") for e in examples[:7]])
    results = json.loads(_run_cli(capsys, ["eval-task", "--checkpoint", str(run), "--task", f"sudoku:path={bare}",
                                           "--split", "all", "--device", "cpu", "--json"]))
    assert results[0]["n"] == 7 and results[0]["task"] == "sudoku"
    # A jsonl copy of the same puzzles, scored by the sudoku verifier, gives the same accuracy.
    jsonl = write_jsonl(tmp_path / "test.jsonl", [{"grid": e.prompt, "solution": e.answer} for e in examples[:7]])
    same = json.loads(_run_cli(capsys, ["eval-task", "--checkpoint", str(run), "--task",
                                        f"jsonl:path={jsonl},prompt=grid,answer=solution,verify=sudoku",
                                        "--split", "all", "--device", "cpu", "--json"]))
    assert same[0]["correct"] == results[0]["correct"]


def test_finetune_refuses_puzzles_without_solutions(tmp_path, capsys):
    bare = write_lines(tmp_path / "bare.txt", [e.prompt for e in sudoku_examples(4, 100)])
    assert main(["finetune", "--task", f"sudoku:path={bare}", "--config", "sudoku4-tiny", *TINY,
                 f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert "have no answer" in capsys.readouterr().err


def test_eval_task_reports_characters_outside_the_checkpoint_vocabulary(sudoku_run, tmp_path, capsys):
    _, run, _ = sudoku_run
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "12", "answer": "3"}, {"prompt": "1+2", "answer": "3"}])
    assert main(["eval-task", "--checkpoint", str(run), "--task", f"jsonl:path={path}", "--split", "all",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t.jsonl:2: character '+' is not in" in err


def test_eval_scores_a_finetune_checkpoint_on_task_answers(sudoku_run, capsys):
    _, run, _ = sudoku_run
    reports = json.loads(_run_cli(capsys, ["eval", "--checkpoint", str(run), "--loops", "1", "2", "--batches", "2",
                                           "--batch-size", "4", "--device", "cpu", "--json"]))
    # 8 validation puzzles x 16 answer cells; prompts are never scored.
    assert [r["tokens"] for r in reports] == [8 * 16, 8 * 16]
    assert all(0 < r["nats_per_token"] < 10 for r in reports)
    text = _run_cli(capsys, ["eval", "--checkpoint", str(run), "--batches", "1", "--batch-size", "2", "--device",
                             "cpu"])
    assert "32 sudoku answers" in text
