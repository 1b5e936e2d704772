"""One code path for single-process and multi-process training: process-group setup from torchrun's environment,
data-parallel wrapping applied from outside the model (DDP or FSDP2), and full state dicts for checkpoints.

Launch with `torchrun --nproc_per_node N ...`; without torchrun's variables everything runs in one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from loopdlm.errors import UserError

MODES = ("ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on this node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the process that writes metrics and checkpoints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is in use."""
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> the local CUDA device if available, else CPU; a bare 'cuda' means this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK (gloo on CPU, nccl on CUDA),
    or describe a single process when they are absent. An already initialised process group is reused."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world_size, local_rank, _bind(resolve_device(device, local_rank)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, _bind(resolve_device(device, 0)))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    target = _bind(resolve_device(device, local_rank))
    backend = "nccl" if target.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            device_id=target if target.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, target)


def teardown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _bind(device: torch.device) -> torch.device:
    # NCCL collectives and bare `.cuda()` calls use the current device, so each process pins its own GPU.
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place. Compiling blocks, not the whole forward, keeps one graph
    for every loop count S (the loop itself stays in Python).

    Inductor's FX-graph and AOT-autograd caches are switched off for the process: in torch 2.13 (seen on CPU) a
    block graph served from them (a second model of the same shapes, or a later process) fails with garbage view
    sizes ("shape '[94321143237888, ...]' is invalid"); compiling afresh costs seconds per block and is safe.
    """
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    for block in model.layers:
        block.compile()


def wrap_model(model: nn.Module, info: DistInfo, mode: str = "ddp") -> nn.Module:
    """Apply data parallelism from outside the model. Returns the module to call for training forwards.

    'ddp': a DistributedDataParallel wrapper (the model itself keeps its plain parameters).
    'fsdp': FSDP2 `fully_shard` on every transformer block and on the root, in place; returns the model itself.
    A single process gets the model back unchanged.
    """
    if mode not in MODES:
        raise UserError(f"unknown train.distributed '{mode}'; choose one of {', '.join(MODES)}")
    if not info.distributed:
        return model
    if mode == "ddp":
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, backward passes reduce gradients across ranks only when `enabled`; gradient accumulation
    disables it on all but the last micro-batch."""
    if enabled:
        yield
    elif isinstance(wrapped, DistributedDataParallel):
        with wrapped.no_sync():
            yield
    elif isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def reshard(model: nn.Module) -> None:
    """Free the gathered full parameters FSDP keeps after a forward without backward (the root keeps them by
    default), so that in-place edits of the sharded parameters (EMA swaps) reach the next forward. A no-op
    without FSDP."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def all_reduce_sum(tensor: Tensor, info: DistInfo) -> Tensor:
    """Sum `tensor` over ranks (in place; returned for chaining). A no-op in a single process."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(tensor: Tensor, info: DistInfo) -> Tensor:
    """Every rank's `tensor` [n, ...] stacked along dim 0 in rank order: [world_size * n, ...] (the tensor itself
    in a single process). Every rank must pass the same shape and dtype; a rank-sharded batch becomes the global
    batch in the order the data sources hand it out."""
    if not info.distributed:
        return tensor
    carrier = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()  # gloo has no bool
    parts = [torch.empty_like(carrier) for _ in range(info.world_size)]
    dist.all_gather(parts, carrier)
    return torch.cat(parts).to(tensor.dtype)


def all_gather_objects(value: T, info: DistInfo) -> list[T]:
    """Every rank's picklable `value`, in rank order ([value] in a single process)."""
    if not info.distributed:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def on_main_rank(info: DistInfo, action: Callable[[], T]) -> T | None:
    """Run `action` on rank 0 only (None elsewhere) and make its UserError every rank's: each rank raises it with
    the same one-line message instead of waiting forever for a rank that has quit. Also a barrier."""
    error = None
    result = None
    if info.is_main:
        try:
            result = action()
        except UserError as exc:
            error = str(exc)
    if info.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error)
    return result


def to_local(value: Tensor) -> Tensor:
    """A plain tensor from a possibly distributed one (e.g. the DTensor gradient norm under FSDP)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, Tensor]:
    """Complete, unsharded weights on CPU, as copies (safe to keep while the model changes), on rank 0; other
    ranks get an empty dict. Every rank must call it (a collective under FSDP). Tensors shared inside the model
    (tied embeddings) stay shared in the copy."""
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return {}
    copies: dict[tuple, Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        state[name] = copies[key]
    return state


def load_full_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load complete weights (every rank passes the full dict). Raises RuntimeError on missing, unexpected or
    mis-shaped entries."""
    if isinstance(model, FSDPModule):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any]:
    """The optimizer's state for a checkpoint: complete on rank 0, empty elsewhere (a collective under FSDP)."""
    if isinstance(model, FSDPModule):
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict() if info.is_main else {}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what `full_optimizer_state` returned (every rank passes the full dict)."""
    if isinstance(model, FSDPModule):
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
