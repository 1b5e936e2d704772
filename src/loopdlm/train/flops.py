"""FLOP accounting for looped models and a measured matmul throughput to compute MFU against."""

from __future__ import annotations

import time

import torch

from loopdlm.models.transformer import LoopedTransformer


def training_flops(model: LoopedTransformer, seq_len: int, loops: float, tokens: int,
                   readout_fraction: float = 1.0) -> float:
    """Matmul FLOPs (forward + backward) to train on `tokens` tokens of length-`seq_len` sequences with the core
    applied `loops` times (the core's layers are counted once per loop) and the head run at `readout_fraction` of
    the positions (an MDLM step reads out only its masked ones)."""
    return model.flops_per_token(seq_len, loops, training=True, readout_fraction=readout_fraction) * tokens


def expected_loops(max_loops: int) -> float:
    """E[S] for S ~ Uniform{1, ..., max_loops}: (max_loops + 1) / 2."""
    return (max_loops + 1) / 2


def measure_matmul_flops(device: torch.device | str, dtype: torch.dtype, size: int = 4096, iters: int = 10) -> float:
    """Achieved dense matmul throughput in FLOP/s: `iters` products of two [size, size] matrices of `dtype` on
    `device`, timed after one warm-up product. It is the denominator of the benchmarks' MFU."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    _synchronize(device)
    torch.matmul(a, b)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    _synchronize(device)
    seconds = time.perf_counter() - start
    return 2 * size**3 * iters / seconds


def _synchronize(device: torch.device) -> None:
    # Kernels run asynchronously on accelerators; timing must wait for them.
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
