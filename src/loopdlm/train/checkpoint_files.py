"""The checkpoint file format: folders written atomically, found through a `latest` pointer, pruned to the newest
few. What a run saves into them, and when, is `train/checkpointing.py`'s job (the `Checkpointer` component).

Layout of one checkpoint, out_dir/checkpoints/step_{N:08d}/:
  model.safetensors   live weights              ema.safetensors   EMA weights (when EMA is on)
  state.pt            optimizer, RNG and data-source state, counters (tensors and plain containers only,
                      so it loads with torch.load(weights_only=True))
  config.json         RunConfig.to_dict()       tokenizer/        written by the caller's tokenizer saver
A checkpoint is assembled in a hidden temporary folder and renamed into place only when complete; the `latest`
pointer is replaced atomically afterwards, so an interrupted save never becomes the checkpoint a resume uses.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from loopdlm.config import RunConfig
from loopdlm.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer updates: 'step_00001234'."""
    return f"step_{step:08d}"


def save_checkpoint(out_dir: str | Path, step: int, *, model_state: dict[str, Tensor],
                    ema_state: dict[str, Tensor] | None, training_state: dict[str, Any], config: RunConfig,
                    tokenizer_saver: Callable[[Path], None] | None = None, keep_last: int = 2) -> Path:
    """Write out_dir/checkpoints/step_{step:08d} atomically, point `latest` at it, and keep only the newest
    `keep_last` checkpoints (all when keep_last <= 0). Returns the checkpoint folder.

    Args:
        model_state / ema_state: complete weights (name -> tensor); tensors shared under several names (tied
            embeddings) are stored once. ema_state None writes no EMA file.
        training_state: anything torch.load(weights_only=True) accepts (tensors, numbers, strings, containers).
        tokenizer_saver: called with the folder the tokenizer must be written into.
    """
    root = Path(out_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    temp = root / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        _write_weights(temp / MODEL_FILE, model_state)
        if ema_state is not None:
            _write_weights(temp / EMA_FILE, ema_state)
        torch.save(training_state, temp / STATE_FILE)
        (temp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
        if tokenizer_saver is not None:
            tokenizer_saver(temp / TOKENIZER_DIR)
        _fsync_tree(temp)
        if final.exists():
            # Only a checkpoint of an abandoned later timeline can sit here (a resume went back past it).
            shutil.rmtree(final)
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _write_text_atomically(root / LATEST_FILE, final.name + "\n")
    _prune(root, keep_last, keep=final)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint folder a resume of the run in `out_dir` should use, or None when there is none.

    Follows the `latest` pointer when it names a complete step folder inside checkpoints/ (a pointer to any other
    place is ignored); otherwise takes the highest-numbered complete step folder.
    """
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    pointer = root / LATEST_FILE
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8").strip()
        if _inside(root, target) and _STEP_DIR.match(target.name) and _is_complete(target):
            return target
    complete = [path for _, path in _step_dirs(root) if _is_complete(path)]
    return complete[-1] if complete else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint), a run's checkpoints/ folder, or a step folder.
    UserError when nothing usable is there."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}")
    for run_dir in (path, path.parent if path.name == CHECKPOINTS_DIR else None):
        if run_dir is not None and (run_dir / CHECKPOINTS_DIR).is_dir():
            found = latest_checkpoint(run_dir)
            if found is None:
                raise UserError(f"no complete checkpoint in {run_dir / CHECKPOINTS_DIR}")
            return found
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a checkpoint: {name} is missing")
    return path


def read_weights(ckpt: str | Path, use_ema: bool = True) -> dict[str, Tensor]:
    """Weights of a checkpoint (EMA weights when `use_ema` and present, else the live ones) as CPU tensors,
    with tied names restored."""
    folder = resolve_checkpoint(ckpt)
    path = folder / EMA_FILE if use_ema and (folder / EMA_FILE).is_file() else folder / MODEL_FILE
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
            aliases = json.loads((handle.metadata() or {}).get("aliases", "{}"))
    except Exception as err:  # safetensors raises several types for truncated or garbled files
        raise UserError(f"corrupt weights file {path}: {_one_line(err)}") from None
    for alias, target in aliases.items():
        state[alias] = state[target]
    return state


def load_model_weights(ckpt: str | Path, model: nn.Module, use_ema: bool = True) -> Path:
    """Load a checkpoint's (EMA) weights into an unwrapped model; returns the checkpoint folder used.
    UserError when the weights do not fit the model (missing/unexpected names, shape mismatch)."""
    folder = resolve_checkpoint(ckpt)
    state = read_weights(folder, use_ema)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"weights in {folder} do not fit the model: {_one_line(err)}") from None
    return folder


def load_checkpoint_config(ckpt: str | Path) -> RunConfig:
    """The RunConfig a checkpoint was trained with."""
    path = resolve_checkpoint(ckpt) / CONFIG_FILE
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return RunConfig.from_saved(values)
    except (ValueError, UserError, AttributeError) as err:
        raise UserError(f"corrupt checkpoint config {path}: {_one_line(err)}") from None


def read_training_state(ckpt: str | Path) -> dict[str, Any]:
    """The optimizer/RNG/data/counter state saved with a checkpoint (CPU tensors), loaded with weights_only."""
    path = resolve_checkpoint(ckpt) / STATE_FILE
    if not path.is_file():
        raise UserError(f"cannot resume from {path.parent}: {STATE_FILE} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message suggests weights_only=False, i.e. running whatever code the file holds.
        raise UserError(f"corrupt training state {path}: not a loopdlm training state (it is damaged or holds "
                        "Python objects besides tensors and plain values); it was not loaded") from None
    except Exception as err:  # truncated zip and the like: the file is unusable
        raise UserError(f"corrupt training state {path}: {_one_line(err)}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"corrupt training state {path}: no step recorded")
    return state


def _write_weights(path: Path, state: dict[str, Tensor]) -> None:
    # safetensors refuses tensors that share memory, so each storage is written once under its first name and
    # the other names are recorded as aliases in the metadata.
    first_name: dict[tuple, str] = {}
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in first_name:
            aliases[name] = first_name[key]
            continue
        first_name[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def _write_text_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f"{_TEMP_PREFIX}{path.name}-{os.getpid()}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def _fsync_tree(folder: Path) -> None:
    # Renaming only publishes data that has reached the disk; flush every file first.
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    # A symbolic link is not a step folder: a checkpoint is only ever read from inside checkpoints/.
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and not p.is_symlink() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def _inside(root: Path, path: Path) -> bool:
    """True when `path` is an entry of `root` itself, also after resolving symbolic links and '..'."""
    return path.parent == root and path.resolve().parent == root.resolve()


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (MODEL_FILE, STATE_FILE, CONFIG_FILE))


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    for entry in root.iterdir():
        if entry.name.startswith(_TEMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)  # left by a process killed mid-save
    current = int(_STEP_DIR.match(keep.name).group(1))
    # Folders numbered past the checkpoint just written belong to a timeline this run has abandoned by resuming
    # from an earlier step; they would otherwise outrank the live run's checkpoints.
    older = []
    for step, path in _step_dirs(root):
        if step > current:
            shutil.rmtree(path, ignore_errors=True)
        elif step < current:
            older.append(path)
    if keep_last > 0:
        for path in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(path, ignore_errors=True)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
