"""The one parser of task specs: "name[:key=value,...]" -> a Task.

Generated tasks: "sudoku4", "sudoku9:givens=30", "add:digits=3,reverse=true", "mul:digits=2". Tasks from files:
"gsm8k:path=F", "jsonl:path=F,prompt=question,answer=answer[,verify=exact|number|sudoku]", "sudoku:path=F".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loopdlm.data.file_tasks import GSM8KTask, JsonlTask, SudokuFileTask
from loopdlm.data.tasks import AdditionTask, MultiplicationTask, SudokuTask, Task
from loopdlm.errors import UserError


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise ValueError(text)


# name -> (factory, {option: parser}, required options); options are passed to the factory as keyword arguments.
_TASKS: dict[str, tuple[Callable[..., Task], dict[str, Callable[[str], object]], tuple[str, ...]]] = {
    "sudoku4": (lambda givens=6, unique=True: SudokuTask(4, givens, unique), {"givens": int, "unique": _parse_bool},
                ()),
    "sudoku9": (lambda givens=30, unique=True: SudokuTask(9, givens, unique), {"givens": int, "unique": _parse_bool},
                ()),
    "add": (AdditionTask, {"digits": int, "reverse": _parse_bool}, ()),
    "mul": (MultiplicationTask, {"digits": int, "reverse": _parse_bool}, ()),
    "gsm8k": (GSM8KTask, {"path": str}, ("path",)),
    "jsonl": (JsonlTask, {"path": str, "prompt": str, "answer": str, "verify": str}, ("path",)),
    "sudoku": (SudokuFileTask, {"path": str}, ("path",)),
}
_OPTION_TO_ARGUMENT = {"reverse": "reverse_answer", "prompt": "prompt_field", "answer": "answer_field"}


def _parse(spec: str) -> tuple[str, dict[str, str]]:
    """(task name, {option: value text}) of a spec; UserError for an unknown task, option or missing file."""
    name, _, options_text = spec.partition(":")
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r} in {spec!r}; valid tasks: {', '.join(_TASKS)}")
    _, parsers, required = _TASKS[name]
    options = {}
    for option in filter(None, options_text.split(",")):
        key, equals, value = option.partition("=")
        if key not in parsers or not equals:
            raise UserError(f"bad option {option!r} for task {name}; valid options: "
                            f"{', '.join(f'{k}=...' for k in parsers)}")
        options[key] = value
    missing = [key for key in required if key not in options]
    if missing:
        raise UserError(f"task {name} needs a file: {name}:path=/path/to/file")
    return name, options


def get_task(spec: str) -> Task:
    """Build the task a spec names (see the module docstring)."""
    name, options = _parse(spec)
    factory, parsers, _ = _TASKS[name]
    kwargs = {}
    for key, value in options.items():
        try:
            kwargs[_OPTION_TO_ARGUMENT.get(key, key)] = parsers[key](value)
        except ValueError:
            raise UserError(f"bad value {value!r} for option {key} of task {name}") from None
    return factory(**kwargs)


def portable_spec(spec: str) -> str:
    """`spec` with a file path made absolute, so a checkpoint's recorded task still opens from another folder."""
    name, options = _parse(spec)
    if "path" in options:
        options["path"] = str(Path(options["path"]).resolve())
    return name + (":" + ",".join(f"{key}={value}" for key, value in options.items()) if options else "")


__all__ = ["get_task", "portable_spec"]
