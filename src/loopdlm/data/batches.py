"""The one batch-source family: fixed rows (in memory, a corpus split, task examples, WINO+ rows, a CoDD top-k pool)
visited by one resumable, rank-sharded `SequenceSampler`.

A `Rows` container says how to cut a batch out of itself (`select`); `RowSource` decides which rows come next. So
every training and validation stream has the same order rule (epochs are permutations drawn from (seed, epoch)), the
same sharding over ranks and the same resumable state {"epoch", "cursor"}.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from loopdlm.errors import UserError


class TokenBatch(NamedTuple):
    """A batch of clean sequences: x0 int64 [B, L]; noisable bool [B, L] (False = never noised nor scored, e.g. a
    prompt) or None = every position. A tuple, so `x0, noisable = batch` works."""

    x0: Tensor
    noisable: Tensor | None = None

    def to(self, device: torch.device | str) -> TokenBatch:
        """The same batch on `device`."""
        return TokenBatch(self.x0.to(device, non_blocking=True),
                          None if self.noisable is None else self.noisable.to(device, non_blocking=True))

    @property
    def num_tokens(self) -> int:
        """Data tokens in the batch (B * L), for throughput."""
        return self.x0.numel()


class Batch(Protocol):
    """What the trainer needs of a batch: a copy on a device and its size in tokens."""

    def to(self, device: torch.device | str) -> Batch: ...

    @property
    def num_tokens(self) -> int: ...


BatchT = TypeVar("BatchT", covariant=True)


class Rows(Protocol[BatchT]):
    """A fixed set of N rows from which batches are cut."""

    def __len__(self) -> int: ...

    def select(self, index: Tensor) -> BatchT:
        """The rows at `index` (int64 [B], CPU) as one batch."""


class BatchSource(Protocol[BatchT]):
    """A resumable stream of this rank's training (or validation) batches."""

    def next_batch(self) -> BatchT:
        """The next batch (e.g. a `TokenBatch`) on any device."""

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream (plain ints/containers, as torch.load(weights_only=True) accepts)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the following batches equal those the saved source would have given."""


class SequenceSampler:
    """Deterministic endless stream of sequence-index batches, resumable and shardable across ranks.

    Each epoch is a fresh permutation of [0, num_sequences) drawn from (seed, epoch). The global batch is the next
    batch_size * world_size entries of it; rank r takes rows [r * batch_size, (r + 1) * batch_size). An epoch's
    leftover entries (fewer than one global batch) are skipped.
    """

    def __init__(self, num_sequences: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad sampler setup: batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.global_batch_size = batch_size * world_size
        if num_sequences < self.global_batch_size:
            raise UserError(
                f"dataset has {num_sequences} sequences, fewer than one global batch of {self.global_batch_size}"
            )
        self.num_sequences = num_sequences
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.load_state_dict({"epoch": 0, "cursor": 0})

    def _permutation(self, epoch: int) -> torch.Tensor:
        # Hashing (seed, epoch) gives unrelated generator seeds for neighbouring seeds and epochs.
        digest = hashlib.sha256(f"{self.seed}/{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randperm(self.num_sequences, generator=generator)

    def next_batch(self) -> torch.Tensor:
        """This rank's next batch of sequence indices: CPU LongTensor [batch_size]."""
        if self.cursor + self.global_batch_size > self.num_sequences:
            self.load_state_dict({"epoch": self.epoch + 1, "cursor": 0})
        start = self.cursor + self.rank * self.batch_size
        batch = self._order[start : start + self.batch_size].clone()
        self.cursor += self.global_batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch: {"epoch": int, "cursor": int (index into the epoch's permutation)}."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`; the following batches equal those the saved sampler would have given."""
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= self.num_sequences:
            raise UserError(f"bad sampler state {state} for {self.num_sequences} sequences")
        self.epoch, self.cursor = epoch, cursor
        self._order = self._permutation(epoch)


class TensorRows:
    """Rows held in memory: tokens int64 [N, L] and optionally noisable bool [N, L]."""

    def __init__(self, tokens: Tensor, noisable: Tensor | None = None):
        if tokens.dim() != 2 or (noisable is not None and noisable.shape != tokens.shape):
            raise ValueError("tokens must be [N, L] and noisable, when given, the same shape")
        self.tokens, self.noisable = tokens, noisable

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: Tensor) -> TokenBatch:
        """TokenBatch of the rows at `index`."""
        return TokenBatch(self.tokens[index], None if self.noisable is None else self.noisable[index])


class RowSource:
    """`BatchSource` over `Rows`, sharded like every other source: each epoch is a permutation of the rows drawn
    from (seed, epoch); a global batch is the next batch_size * world_size entries of it and rank r takes entries
    [r * batch_size, (r + 1) * batch_size); an epoch's leftover entries (fewer than a global batch) are skipped.

    characters_per_token, when known (a corpus split), lets validation report bits per character.
    """

    def __init__(self, rows: Rows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 characters_per_token: float | None = None):
        self.rows = rows
        self.characters_per_token = characters_per_token
        self.sampler = SequenceSampler(len(rows), batch_size, seed, rank=rank, world_size=world_size)

    def next_batch(self):
        """This rank's rows of the next global batch (what `rows.select` makes of them)."""
        return self.rows.select(self.sampler.next_batch())

    def state_dict(self) -> dict[str, int]:
        """{"epoch": int, "cursor": int}: the permutation in use and the position in it."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()`."""
        self.sampler.load_state_dict(state)


class TensorBatchSource(RowSource):
    """`RowSource` over in-memory tokens int64 [N, L] (and optionally noisable bool [N, L])."""

    def __init__(self, tokens: Tensor, noisable: Tensor | None = None, batch_size: int = 8, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(TensorRows(tokens, noisable), batch_size, seed, rank, world_size)


class PairedSource:
    """Two sources read in step: each batch is `combine(first.next_batch(), second.next_batch())` (e.g. WINO+ rows
    with the supervised anchor's task rows); resumable as the pair of their states."""

    def __init__(self, first: BatchSource, second: BatchSource, combine):
        self.first, self.second, self.combine = first, second, combine

    def next_batch(self):
        return self.combine(self.first.next_batch(), self.second.next_batch())

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first.state_dict(), "second": self.second.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first.load_state_dict(state["first"])
        self.second.load_state_dict(state["second"])


__all__ = ["Batch", "BatchSource", "PairedSource", "RowSource", "Rows", "SequenceSampler", "TensorBatchSource",
           "TensorRows", "TokenBatch"]
