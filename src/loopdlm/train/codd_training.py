"""Training CoDD's HMM prior on a frozen model (ALGORITHMS.md section 6).

Objective: maximise E_t[w(t) log p^(x_0 | x_t)] over the HMM's parameters only, where p^ is the product of experts
HMM(x) * prod_i q_i(x_i) / Z over a window of W positions and q is the frozen model's p_theta(x_0 | x_t). Each
sequence gets one t, stratified over the batch, its tokens are masked with probability 1 - alpha(t) and the window
term is weighted by w(t) (1/t for the log-linear schedule), exactly as in the MDLM NELBO; the reported loss is
-sum_windows w(t) log p^(x_0 | x_t) divided by the number of noisable positions, i.e. nats per token on the NELBO's
scale. A one-state, uniform-emission HMM reproduces the factorised NELBO exactly, and `factorised_nelbo` on the same
batch is printed beside it as the baseline the prior has to beat.

Context and windows: the frozen model always runs on the whole noisy sequence x_t, as at sampling time where a
block is decoded with the full sequence as context. Its log-probs over the generation region (from the first column
any row may noise to the end, e.g. the answer of a task row) are then cut into consecutive windows of W positions
starting at the region's first column, the same layout as the sampler's blocks, and each window is scored by the
HMM on its own (the last window may be shorter). The frozen model may be plain or looped (any S), or any callable
tokens -> log-probs.

Frozen model outputs: with topk = 0 they are recomputed every step (one frozen forward pass per step, no
backward). With topk = k > 0 a pool of noisy batches is run through the frozen model once and only each position's
top-k log-probs are kept (k * 8 bytes per position), which makes every training step a pure HMM computation. The
mass outside the top-k, 1 - sum(top-k), is spread evenly over the other non-mask tokens rather than dropped:
dropping it would give a target outside the top-k probability 0 and make its log p^ = -inf.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from loopdlm.config import RunConfig
from loopdlm.data.batches import RowSource, TokenBatch
from loopdlm.data.task_source import encode_task, task_examples, task_of, task_rows
from loopdlm.data.tokenizers import Tokenizer
from loopdlm.diffusion.masked import MaskedDiffusion, apply_mask, subs_log_probs
from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling.codd import HMMPrior
from loopdlm.sampling.coupling import save_codd_layer, window_chunks
from loopdlm.train.callbacks import Callback
from loopdlm.train.distributed import DistInfo, all_gather_rows, on_main_rank, setup_distributed
from loopdlm.train.objective import LossTerms, ModelCall, Objective
from loopdlm.train.trainer import Trainer
from loopdlm.workflow import (
    build_objective,
    checkpoint_corpus_split,
    load_pretrained,
)

#: The frozen model whose outputs the prior couples: tokens int64 [B, L] (x_t) -> SUBS log-probs float [B, L, V].
FrozenLogProbs = Callable[[Tensor], Tensor]

#: Most task examples generated for a task checkpoint's prior (generation is not free, e.g. for sudoku).
MAX_TASK_EXAMPLES = 20_000


class SequenceSource(Protocol):
    """A stream of clean training rows (the trainer's BatchSource satisfies it)."""

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """(x0 int64 [B, L], noisable bool [B, L] or None = every position)."""


def frozen_log_probs(model: LoopedTransformer, mask_id: int, loops: int = 1) -> FrozenLogProbs:
    """The model frozen as q: tokens [B, L] (x_t) -> SUBS log-probs float32 [B, L, V] at S = `loops`, no grad."""
    if loops < 1:
        raise UserError(f"loops must be >= 1, got {loops}")
    model.eval()

    @torch.no_grad()
    def log_probs(tokens: Tensor) -> Tensor:
        return subs_log_probs(model(tokens, loops=loops).logits, mask_id)

    return log_probs


@dataclass
class NoisyBatch:
    """One batch restricted to the generation region of R columns.

    x0 int64 [B, R]; log_q float [B, R, V] the frozen model's log-probs given the whole x_t; observed bool [B, R]
    (unmasked in x_t); weight float [B] = w(t); row_tokens int64 [B]: noisable positions per row in the region
    (their sum is the loss denominator).
    """

    x0: Tensor
    log_q: Tensor
    observed: Tensor
    weight: Tensor
    row_tokens: Tensor

    def to(self, device: torch.device | str) -> NoisyBatch:
        return NoisyBatch(*(t.to(device) for t in (self.x0, self.log_q, self.observed, self.weight, self.row_tokens)))

    @property
    def num_tokens(self) -> int:
        return self.x0.numel()


def region_start(noisable: Tensor | None) -> int:
    """First column any row may noise (0 when noisable is None): where the windows start. noisable: bool [B, L]."""
    if noisable is None:
        return 0
    columns = noisable.any(dim=0).nonzero()
    if len(columns) == 0:
        raise UserError("the training rows have no noisable position")
    return int(columns[0])


def draw_noisy_batch(frozen: FrozenLogProbs, x0: Tensor, noisable: Tensor | None, diffusion: MaskedDiffusion,
                     generator: torch.Generator | None, rows: slice = slice(None)) -> NoisyBatch:
    """Noise x0 [B, L] (one stratified t per row), run the frozen model on the whole x_t and keep the region.

    rows: keep only these rows (a rank's share of a global batch). The noise is still drawn for the whole batch,
    as one process would draw it, and the frozen model runs on the kept rows only."""
    t = diffusion.sample_times(x0.shape[0], generator, x0.device)
    xt, masked = apply_mask(x0, diffusion.schedule.mask_probability(t)[:, None], noisable, diffusion.mask_id,
                            generator)
    start = region_start(noisable)
    x0, xt, masked, t = x0[rows], xt[rows], masked[rows], t[rows]
    noisable = None if noisable is None else noisable[rows]
    row_tokens = (noisable[:, start:].sum(dim=1) if noisable is not None
                  else torch.full((x0.shape[0],), x0.shape[1] - start, device=x0.device))
    return NoisyBatch(x0=x0[:, start:], log_q=frozen(xt)[:, start:].float(), observed=~masked[:, start:],
                      weight=diffusion.schedule.weight(t).float(), row_tokens=row_tokens)


def coupled_nelbo(prior: HMMPrior, batch: NoisyBatch, window: int, chunk_size: int | None = None) -> Tensor:
    """-sum over rows and windows of w(t) log p^(x0_window | x_t) / sum(row_tokens): scalar, differentiable in the
    prior's parameters (nats per token)."""
    return coupled_nll_sum(prior, batch, window, chunk_size) / batch.row_tokens.sum().clamp(min=1)


def coupled_nll_sum(prior: HMMPrior, batch: NoisyBatch, window: int, chunk_size: int | None = None) -> Tensor:
    """-sum over rows and windows of w(t) log p^(x0_window | x_t): scalar (nats), differentiable in the prior."""
    total = batch.log_q.new_zeros(())
    for part in window_chunks(batch.x0.shape[1], window):
        log_p = prior.log_prob(batch.x0[:, part], batch.log_q[:, part], batch.observed[:, part], chunk_size=chunk_size)
        total = total - (batch.weight.to(log_p.dtype) * log_p).sum()
    return total


class CoupledScorer(nn.Module):
    """The trainable of CoDD prior fitting: the prior scoring noisy batches window by window.
    forward(NoisyBatch) -> `coupled_nll_sum` (what the trainer back-propagates)."""

    def __init__(self, prior: HMMPrior, window: int, chunk_size: int | None = None):
        super().__init__()
        self.prior, self.window, self.chunk_size = prior, window, chunk_size

    def forward(self, batch: NoisyBatch) -> Tensor:
        return coupled_nll_sum(self.prior, batch, self.window, self.chunk_size)


class CoupledPriorObjective(Objective):
    """CoDD prior fitting as a trainer objective: the coupled NELBO in nats per noisable token, with the frozen
    model's own factorised NELBO on the same batch as the metric "factorised". Batches are clean `TokenBatch`es,
    noised with the step's generator and scored by `frozen` (the frozen model's log-probs), or `NoisyBatch`es of a
    top-k pool, used as they are.

    fitted_to: what the prior is fitted to (the frozen model, its S, the data and the prior's settings; JSON-like
    values), saved with checkpoints: resuming a run folder whose prior was fitted to something else is refused, so
    a prior never mixes two frozen models or two settings."""

    def __init__(self, frozen: FrozenLogProbs | None, diffusion: MaskedDiffusion,
                 fitted_to: dict[str, Any] | None = None):
        self.frozen, self.diffusion, self.fitted_to = frozen, diffusion, dict(fitted_to or {})

    def loss(self, scorer: ModelCall, batch: TokenBatch | NoisyBatch, generator: torch.Generator) -> LossTerms:
        if not isinstance(batch, NoisyBatch):
            batch = draw_noisy_batch(self.frozen, batch.x0, batch.noisable, self.diffusion, generator)
        count = batch.row_tokens.sum().clamp(min=1).float()
        return LossTerms(total=scorer(batch), count=count,
                         metrics={"factorised": factorised_nelbo(batch).detach() * count})

    def state_dict(self) -> dict[str, Any]:
        return {"fitted_to": self.fitted_to}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("fitted_to", {})
        differing = sorted(key for key in saved.keys() | self.fitted_to.keys()
                           if saved.get(key) != self.fitted_to.get(key))
        if differing:
            raise UserError("the run folder holds a prior fitted with other settings (" + ", ".join(
                f"{key} {saved.get(key)!r} -> {self.fitted_to.get(key)!r}" for key in differing) +
                "); use the same settings to resume it, or another folder")


def factorised_nelbo(batch: NoisyBatch) -> Tensor:
    """The frozen model's own weighted NLL on the same batch and scale (MDLM's NELBO): scalar, nats per token."""
    nll = -batch.log_q.gather(-1, batch.x0.unsqueeze(-1)).squeeze(-1)
    weighted = torch.where(batch.observed, torch.zeros_like(nll), nll) * batch.weight[:, None]
    return weighted.sum() / batch.row_tokens.sum().clamp(min=1)


class TopKPool:
    """Noisy batches whose frozen-model outputs are cached as top-k log-probs (see the module docstring).

    Stores x0 [P, R], observed [P, R], weight [P], row_tokens [P], values float32 [P, R, k] and indices int32
    [P, R, k], and returns dense batches on request. vocab_size counts every id; mask_id never receives mass.
    """

    def __init__(self, batches: list[NoisyBatch], topk: int, vocab_size: int, mask_id: int):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        widths = {batch.x0.shape[1] for batch in batches}
        if len(widths) != 1:
            raise UserError(f"cached batches have different generation regions {sorted(widths)}; use topk=0")
        self.k = min(topk, vocab_size - 1)  # the mask id has probability 0 and is never worth a slot
        self.vocab_size, self.mask_id = vocab_size, mask_id
        tops = [batch.log_q.topk(self.k, dim=-1) for batch in batches]
        self.values = torch.cat([top.values.float() for top in tops])
        self.indices = torch.cat([top.indices.to(torch.int32) for top in tops])
        self.x0 = torch.cat([batch.x0 for batch in batches])
        self.observed = torch.cat([batch.observed for batch in batches])
        self.weight = torch.cat([batch.weight for batch in batches])
        self.row_tokens = torch.cat([batch.row_tokens for batch in batches])

    def __len__(self) -> int:
        return len(self.x0)

    def gather_ranks(self, info: DistInfo, batches: int) -> None:
        """Turn this rank's pool, built from its rows of `batches` global batches, into the whole pool, in place:
        every rank then holds every global batch's entries, batch after batch and within a batch in rank order,
        i.e. the pool one process builds from the same global batches. A no-op in a single process."""
        if not info.distributed:
            return
        for name in ("values", "indices", "x0", "observed", "weight", "row_tokens"):
            local = getattr(self, name)
            by_rank = all_gather_rows(local, info).view(info.world_size, batches, -1, *local.shape[1:])
            setattr(self, name, by_rank.transpose(0, 1).reshape(-1, *local.shape[1:]))

    def select(self, rows: Tensor) -> NoisyBatch:
        """Dense NoisyBatch of the pool entries `rows` (int64 [B])."""
        values, indices = self.values[rows], self.indices[rows].long()
        log_q = densify_topk(values, indices, self.vocab_size, self.mask_id)
        return NoisyBatch(x0=self.x0[rows], log_q=log_q, observed=self.observed[rows], weight=self.weight[rows],
                          row_tokens=self.row_tokens[rows])


def densify_topk(values: Tensor, indices: Tensor, vocab_size: int, mask_id: int) -> Tensor:
    """Full log-probs from top-k ones: values float [..., k], indices int64 [..., k] -> [..., V]. The leftover mass
    1 - sum(exp(values)) is spread evenly over the V - 1 - k other non-mask ids (floored at the dtype's smallest
    normal number, so no target is ever -inf); the mask id gets -inf."""
    others = vocab_size - 1 - values.shape[-1]
    if others > 0:
        kept = torch.logsumexp(values, dim=-1, keepdim=True)
        leftover = (-torch.expm1(kept)).clamp_min(torch.finfo(values.dtype).tiny)
        fill = torch.log(leftover) - math.log(others)
    else:
        fill = torch.full_like(values[..., :1], -math.inf)
    dense = fill.expand(*values.shape[:-1], vocab_size).clone()
    dense[..., mask_id] = -math.inf
    return dense.scatter_(-1, indices, values)


@dataclass
class CoDDTrainConfig:
    """HMM size and optimisation. window: W (the decoding block the prior will be used with); topk: 0 recomputes
    the frozen model's log-probs every step, k > 0 caches top-k log-probs of `pool_batches` noisy batches once and
    trains on random batches of the pool; chunk_size: vocabulary chunk of the soft evidence (None = all of V)."""

    n_states: int = 64
    window: int = 32
    steps: int = 500
    lr: float = 0.05
    topk: int = 0
    pool_batches: int = 32
    chunk_size: int | None = None
    init_std: float = 0.5
    log_every: int = 50
    seed: int = 0

    def validate(self) -> None:
        """Raise UserError for values no run can use."""
        for name in ("n_states", "window", "steps", "pool_batches", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"CoDD training: {name} must be >= 1, got {getattr(self, name)}")
        if self.topk < 0:
            raise UserError(f"CoDD training: topk must be >= 0 (0 = recompute), got {self.topk}")
        if not self.lr > 0:
            raise UserError(f"CoDD training: lr must be > 0, got {self.lr}")


@dataclass
class CoDDTrainResult:
    """The trained prior (on the training device), per-step (step, coupled, factorised) losses in nats/token,
    training wall time in seconds (pool building included) and the number of the frozen model's forward passes."""

    prior: HMMPrior
    history: list[tuple[int, float, float]] = field(default_factory=list)
    seconds: float = 0.0
    frozen_passes: int = 0


def initial_prior(n_states: int, vocab_size: int, init_std: float, seed: int) -> HMMPrior:
    """A fresh HMMPrior on the CPU whose logits are N(0, init_std^2) drawn from `seed` (the global RNG is untouched)."""
    prior = HMMPrior(n_states, vocab_size, init_std)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in prior.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * init_std)
    return prior


def train_codd_prior(frozen: FrozenLogProbs, source: SequenceSource, diffusion: MaskedDiffusion, vocab_size: int,
                     config: CoDDTrainConfig, device: torch.device | str = "cpu",
                     on_log: Callable[[int, float, float], None] | None = None, out_dir: str | Path | None = None,
                     fitted_to: dict[str, Any] | None = None, dist: DistInfo | None = None) -> CoDDTrainResult:
    """Fit a fresh HMMPrior(config.n_states, vocab_size) to the `frozen` model with the `Trainer` (Adam at a
    constant rate: AdamW without weight decay, no clipping, no EMA).

    Args:
        frozen: tokens [B, L] -> log-probs [B, L, V] (e.g. `frozen_log_probs`); never differentiated.
        source: this rank's clean rows (shard a `RowSource` by `dist`'s rank and world size); `next_batch()` is
            called once per step (topk = 0) or pool_batches times (topk > 0, the pool then feeds the steps through
            a `RowSource` sharded by rank).
        diffusion: noise schedule, times and mask id (one stratified t per row).
        vocab_size: V, every id of the model's vocabulary (mask included).
        on_log: called as on_log(step, coupled, factorised) every config.log_every steps and at the last one.
        out_dir: run folder (metrics.jsonl, checkpoints; a second call on it resumes); None = in memory.
        fitted_to: what `frozen` and `source` are (e.g. the checkpoint, S, batch size), recorded with the prior's
            settings in every checkpoint; a resume with other values is refused (`CoupledPriorObjective`).
        dist: this process's place under torchrun (default `setup_distributed(device)`); only rank 0 writes.
    Returns:
        CoDDTrainResult (the same prior on every rank; frozen_passes counts this rank's passes).

    Under torchrun each rank scores its share of every global batch. The top-k pool is built in shares too: every
    rank draws the noise of the whole global batch from the one seeded stream, runs the frozen model on its own
    rows only, and the ranks then exchange their top-k entries, so each holds the pool one process would build
    (exchanging is cheap, k x 8 bytes a position, while the frozen passes are the pool's cost). Since a pool
    batch carries its noise and the coupled NELBO is a sum over tokens divided by the global count, 2 ranks x
    batch B then train exactly as 1 process x batch 2B; with topk = 0 the noise is drawn per rank's micro-batch
    (`Trainer`), so 2 ranks x B equal 1 process x B with 2 accumulated micro-batches.
    """
    config.validate()
    dist = dist if dist is not None else setup_distributed(str(torch.device(device)))
    start_time = time.perf_counter()
    prior = initial_prior(config.n_states, vocab_size, config.init_std, config.seed).to(device)
    passes = 0

    def counted(tokens: Tensor) -> Tensor:
        nonlocal passes
        passes += 1
        return frozen(tokens)

    if config.topk > 0:
        generator = torch.Generator(device=device).manual_seed(config.seed)
        noisy = []
        for _ in range(config.pool_batches):
            x0, noisable = source.next_batch().to(device)
            mine = slice(dist.rank * len(x0), (dist.rank + 1) * len(x0))
            noisy.append(draw_noisy_batch(counted, all_gather_rows(x0, dist),
                                          None if noisable is None else all_gather_rows(noisable, dist),
                                          diffusion, generator, rows=mine))
        pool = TopKPool(noisy, config.topk, vocab_size, diffusion.mask_id)
        pool.gather_ranks(dist, config.pool_batches)
        source = RowSource(pool, len(noisy[0].x0), config.seed, dist.rank, dist.world_size)
    run = RunConfig()
    train = run.train
    train.steps, train.lr, train.seed, train.device, train.precision = config.steps, config.lr, config.seed, \
        str(torch.device(device)), "fp32"
    train.warmup_steps, train.lr_schedule, train.weight_decay, train.grad_clip, train.ema_decay = 0, "constant", \
        0.0, 0.0, 0.0
    train.eval_every, train.ckpt_every, train.log_every = 0, 0, config.log_every
    logger = [_LogCoupled(on_log)] if on_log is not None else []
    trainer = Trainer(run, CoupledScorer(prior, config.window, config.chunk_size),
                      CoupledPriorObjective(counted, diffusion, {**(fitted_to or {}), **prior_settings(config)}),
                      source, None, out_dir, dist=dist, callbacks=logger)
    fitted = trainer.fit()
    history = [(step, record["loss"], record["factorised"]) for (step, _, _), record in
               zip(fitted.history, fitted.records)]
    return CoDDTrainResult(prior=prior, history=history, seconds=time.perf_counter() - start_time,
                           frozen_passes=passes)


def prior_settings(config: CoDDTrainConfig) -> dict[str, Any]:
    """The settings that shape what a run fits (not how long it runs): HMM size, window, data and noise."""
    return {"n_states": config.n_states, "window": config.window, "topk": config.topk,
            "pool_batches": config.pool_batches, "init_std": config.init_std, "seed": config.seed}


class _LogCoupled(Callback):
    """Calls on_log(step, coupled, factorised) every train.log_every updates and at the last one."""

    def __init__(self, on_log: Callable[[int, float, float], None]):
        self.on_log = on_log

    def on_step_end(self, trainer: Trainer, last: bool) -> bool:
        every = trainer.config.train.log_every
        if last or (every > 0 and trainer.step % every == 0):
            self.on_log(trainer.step, trainer.last_record["loss"], trainer.last_record["factorised"])
        return False


@torch.no_grad()
def evaluate_codd(prior: HMMPrior, frozen: FrozenLogProbs, source: SequenceSource, diffusion: MaskedDiffusion,
                  window: int, batches: int = 8, seed: int = 0, chunk_size: int | None = None,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean coupled and factorised objectives (nats/token) over `batches` batches of `source` with noise drawn
    from `seed`, so two priors evaluated on equal sources and seeds see identical noisy batches.
    Returns {"coupled": float, "factorised": float}."""
    generator = torch.Generator(device=device).manual_seed(seed)
    coupled = factorised = 0.0
    for _ in range(batches):
        x0, noisable = source.next_batch()
        batch = draw_noisy_batch(frozen, x0.to(device), None if noisable is None else noisable.to(device),
                                 diffusion, generator)
        coupled += float(coupled_nelbo(prior, batch, window, chunk_size))
        factorised += float(factorised_nelbo(batch))
    return {"coupled": coupled / batches, "factorised": factorised / batches}


def checkpoint_training_source(run: RunConfig, tokenizer: Tokenizer, batch_size: int, config: CoDDTrainConfig,
                               dist: DistInfo | None = None) -> SequenceSource:
    """This rank's clean training rows for a checkpoint's prior (`batch_size` of each global batch of batch_size x
    world_size rows): its task's train split for a task checkpoint (data.task, answer region noisable; as many
    examples as the run consumes, at most 20000), else its corpus' train split (prepared on first use, rank 0
    first, as `loopdlm train` does). UserError when the data's tokenizer differs from the checkpoint's."""
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    task = task_of(run.data)
    if task is not None:
        global_batch = batch_size * world_size
        wanted = global_batch * (config.pool_batches if config.topk else config.steps)
        examples = task_examples(task, min(max(wanted, global_batch), MAX_TASK_EXAMPLES), config.seed, "train")
        return RowSource(task_rows(encode_task(task, examples, tokenizer)), batch_size, config.seed, rank,
                         world_size)
    if dist is not None and dist.distributed:
        # Rank 0 prepares a corpus seen for the first time while the others wait (`on_main_rank` is also a barrier).
        on_main_rank(dist, lambda: checkpoint_corpus_split(run.data, tokenizer, "train"))
    return RowSource(checkpoint_corpus_split(run.data, tokenizer, "train"), batch_size, config.seed, rank, world_size)


def train_codd_from_checkpoint(checkpoint: str | Path, out: str | Path, config: CoDDTrainConfig, batch_size: int,
                               loops: int = 0, device: str = "auto", log: Callable[[str], None] = print
                               ) -> CoDDTrainResult:
    """Train a prior for a checkpoint on its own training data and save it into `out` (see save_codd_layer).

    `out` is also the run folder (metrics.jsonl, checkpoints/): a second call on it resumes the run, so re-running
    an interrupted or shorter run (more config.steps) continues it exactly as one uninterrupted run; a call with
    another checkpoint, S, batch size or prior settings is refused. The checkpoint's config names the data (corpus
    or task, see checkpoint_training_source) and the model; loops: S for the frozen model (0 = the model's training
    S_max). Raises UserError for an unusable checkpoint, data tokenised differently from the checkpoint, a
    block-diffusion checkpoint, or bad settings.

    Under torchrun every process fits the prior on `batch_size` rows of each global batch (see `train_codd_prior`);
    only rank 0 logs and writes. The recorded batch size is the global one (batch_size x processes).
    """
    config.validate()
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    dist = setup_distributed(device)
    target = dist.device
    if not dist.is_main:
        log = _silent
    loaded = load_pretrained(checkpoint, target)
    run, tokenizer, model = loaded.config, loaded.tokenizer, loaded.model
    objective = build_objective(run, tokenizer.mask_id)
    if not isinstance(objective, MaskedDiffusion):
        raise UserError("train-codd supports MDLM checkpoints only (block diffusion is not supported yet)")
    source = checkpoint_training_source(run, tokenizer, batch_size, config, dist)
    depth = loops or model.config.max_loops
    frozen = frozen_log_probs(model, tokenizer.mask_id, depth)
    global_batch = batch_size * dist.world_size
    processes = f" ({batch_size} x {dist.world_size} processes)" if dist.distributed else ""
    log(f"training a {config.n_states}-state CoDD prior (W={config.window}) on {loaded.path} with S={depth}, "
        f"{config.steps} steps, batch {global_batch}{processes}, "
        + (f"top-{config.topk} cache" if config.topk else "recomputed q"))
    fitted_to = {"checkpoint": str(Path(loaded.path).resolve()), "loops": depth, "batch_size": global_batch}
    result = train_codd_prior(frozen, source, objective, tokenizer.vocab_size, config, target,
                              on_log=lambda step, coupled, factorised: log(
                                  f"step {step}: coupled {coupled:.4f} nats/token (factorised {factorised:.4f})"),
                              out_dir=out, fitted_to=fitted_to, dist=dist)
    on_main_rank(dist, lambda: save_codd_layer(
        result.prior, out, config.window, tokenizer.fingerprint(),
        {"checkpoint": str(loaded.path), "loops": depth, "steps": config.steps, "topk": config.topk,
         "lr": config.lr, "batch_size": global_batch, "seconds": round(result.seconds, 3)}))
    log(f"saved CoDD prior to {out} ({sum(p.numel() for p in result.prior.parameters())} parameters, "
        f"{result.seconds:.1f} s)")
    return result


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


__all__ = ["CoDDTrainConfig", "CoDDTrainResult", "CoupledPriorObjective", "CoupledScorer", "FrozenLogProbs",
           "NoisyBatch", "TopKPool", "checkpoint_training_source", "coupled_nelbo", "coupled_nll_sum", "densify_topk",
           "draw_noisy_batch", "evaluate_codd", "factorised_nelbo", "frozen_log_probs", "initial_prior",
           "region_start", "train_codd_from_checkpoint", "train_codd_prior"]
