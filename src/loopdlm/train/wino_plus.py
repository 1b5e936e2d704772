"""WINO+: distil WINO's revokable decoding into a model that plain threshold decoding can run fast.

1. Record: decode task prompts with WINO (tau1 0.5, tau2 0.8) and keep, per prompt, the first decode the task's
   verifier accepts, retrying at rising temperature (0, 0.1, ..., 0.5). For every generated token, note the step at
   which it was last accepted (its final acceptance; earlier acceptances were revoked).
2. Rows: one training row per step k of a trajectory: tokens finally accepted before k are visible, the rest of
   the answer is masked; targets are the tokens finally accepted at step k.
3. Loss: cross-entropy on the targets, + w_min * entropy of targets the model already gets right but unsurely
   (max prob < 0.9), - w_max * entropy of masked non-target slots of the current block where the model is confident
   (max prob > 0.6) and wrong (argmax != the verified final token). As in the reference (WINO+, Feng-Hong/WINO-DLLM),
   each term is the mean over its own positions (CE over the targets, sharpening over the unsure targets, deferral
   over the confident errors), pooled over the batch; a term with no positions is 0.
   Optionally (`SupervisedAnchor`) the model's own task NELBO on clean training rows is added at every step, so the
   fine-tune cannot trade task knowledge for confidence; optionally (`EarlyStopping`) a held-out score is checked
   every few steps and the best weights (possibly the starting ones) are kept.
4. Decode the fine-tuned model with plain threshold decoding (sampler 'threshold'; no shadow block), e.g. with
   `loopdlm.eval.tasks.task_accuracy`.

Rows use the task layout of `loopdlm.data.task_source.encode_task` (the one `loopdlm finetune` trains on).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from loopdlm.config import RunConfig
from loopdlm.data.batches import PairedSource, RowSource, TensorRows, TokenBatch
from loopdlm.data.task_source import answer_canvas, encode_task
from loopdlm.data.tasks import Example, Task, decode_answers
from loopdlm.diffusion.masked import MaskedDiffusion, subs_log_probs
from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.sampling import SamplerConfig, build_decoder
from loopdlm.sampling.engine import SampleResult, WindowPrediction, WindowPredictor
from loopdlm.sampling.parallel import predictive_entropy
from loopdlm.train.callbacks import EarlyStopping
from loopdlm.train.distributed import DistInfo, all_gather_objects, setup_distributed
from loopdlm.train.objective import LossTerms, ModelCall, Objective, model_logits
from loopdlm.train.trainer import Trainer

#: WINO+'s recording sampler: WINO with the paper's offline thresholds; one block over the whole answer.
RECORDING_SPEC = SamplerConfig.from_flags("wino", tau1=0.5, tau2=0.8, temperature=0.0)
RETRY_TEMPERATURES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass
class Trajectory:
    """One verified decode of one prompt.

    tokens: int64 [L], the final sequence (prompt region and answer).
    accept_step: int64 [L], the row's own step (0-based, counting only steps in which the row changed) at which each
        generated token was last accepted; -1 on columns that were never generated (the prompt).
    window_index: int64 [L], which decoding window each generated column belonged to; -1 on the prompt.
    example_index: position of the prompt in the recorded example list; temperature: the decode that passed.
    """

    tokens: Tensor
    accept_step: Tensor
    window_index: Tensor
    example_index: int
    temperature: float

    @property
    def steps(self) -> int:
        """Steps the decode took (its last final acceptance + 1)."""
        return int(self.accept_step.max()) + 1


@dataclass
class WinoPlusRows:
    """Training rows, N of them, each of length L.

    inputs: int64 [N, L], x at step k (finally accepted before k visible, the rest of the answer masked).
    clean: int64 [N, L], the verified final sequence.
    targets: bool [N, L], tokens finally accepted at step k.
    block: bool [N, L], the columns of the window decoded at step k.
    """

    inputs: Tensor
    clean: Tensor
    targets: Tensor
    block: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def subset(self, index: Tensor) -> WinoPlusRows:
        """Rows at `index` (int64 [n]) as a new WinoPlusRows."""
        return WinoPlusRows(self.inputs[index], self.clean[index], self.targets[index], self.block[index])

    def select(self, index: Tensor) -> WinoPlusBatch:
        """The rows at `index` as a training batch (the `Rows` of a `RowSource`)."""
        return WinoPlusBatch(self.subset(index))

    def to(self, device: torch.device | str) -> WinoPlusRows:
        """The same rows on `device`."""
        return WinoPlusRows(*(t.to(device) for t in (self.inputs, self.clean, self.targets, self.block)))


@dataclass
class WinoPlusBatch:
    """One WINO+ training batch: rows, and the supervised anchor's clean task rows (or None)."""

    rows: WinoPlusRows
    anchor: TokenBatch | None = None

    def to(self, device: torch.device | str) -> WinoPlusBatch:
        return WinoPlusBatch(self.rows.to(device), None if self.anchor is None else self.anchor.to(device))

    @property
    def num_tokens(self) -> int:
        """Tokens of the WINO+ rows and the anchor rows."""
        return self.rows.inputs.numel() + (self.anchor.num_tokens if self.anchor is not None else 0)


# ------------------------------------------------------------------------------------------------- recording


class StateRecorder:
    """Window predictor wrapper that keeps a CPU copy of x_t, and the window, at every forward pass it serves.

    Every step of a decode that changes x_t is followed by a forward pass (or ends the decode), so these states plus
    the final tokens contain every distinct x_t of the decode in order.
    """

    def __init__(self, inner: WindowPredictor):
        self.inner = inner
        self.states: list[Tensor] = []
        self.windows: list[slice] = []

    def __call__(self, tokens: Tensor, window: slice, progress: float) -> WindowPrediction:
        self.states.append(tokens.to("cpu", copy=True))
        self.windows.append(window)
        return self.inner(tokens, window, progress)

    def begin_window(self, tokens: Tensor, window: slice) -> None:
        self.inner.begin_window(tokens, window)

    def end_window(self, tokens: Tensor, window: slice) -> None:
        self.inner.end_window(tokens, window)


@dataclass
class RecordedDecode:
    """A decode with its history. states: CPU int64 [B, L] tensors, x_t before each forward pass and finally the
    decoded tokens; windows: the window each forward pass decoded (in order, repeated per pass)."""

    result: SampleResult
    states: list[Tensor]
    windows: list[slice]

    def accept_steps(self, mask_id: int) -> Tensor:
        """`last_acceptance_steps` of this decode: int64 [B, L]."""
        return last_acceptance_steps(self.states, mask_id)

    def window_index(self, mask_id: int) -> Tensor:
        """int64 [B, L]: the order of the window that generated each column; -1 on columns given in the input."""
        index = torch.full((self.states[0].shape[1],), -1, dtype=torch.long)
        for order, window in enumerate(dict.fromkeys((w.start, w.stop) for w in self.windows)):
            index[window[0]:window[1]] = order
        initial = self.states[0]
        return torch.where(initial == mask_id, index.expand_as(initial), torch.full_like(initial, -1))


def decode_recorded(model: LoopedTransformer, tokens: Tensor, mask_id: int, spec: SamplerConfig,
                    generator: torch.Generator | None = None) -> RecordedDecode:
    """`Decoder.fill` (same predictor and selector for `spec`) that also records the decode's states and windows.

    tokens int64 [B, L] -> RecordedDecode.
    """
    decoder = build_decoder(model, None, spec, mask_id)
    recorder = StateRecorder(decoder.sequence_predictor())
    result = decoder.fill(tokens, generator, predictor=recorder)
    return RecordedDecode(result, [*recorder.states, result.tokens.to("cpu", copy=True)], recorder.windows)


def last_acceptance_steps(states: Sequence[Tensor], mask_id: int) -> Tensor:
    """For every column, the step at which it was last turned from mask into a token, counted per row.

    states: successive x_t of a decode, each int64 [B, L] (`RecordedDecode.states`); repeated states are allowed. A
    row's step counter advances only between states that differ in that row, so a row's numbering does not depend
    on how long other rows of its batch took (batched and row-by-row decodes give the same steps).
    Returns int64 [B, L]; -1 where a column was never accepted.
    """
    states = torch.stack(list(states))  # [T + 1, B, L]
    accepted = (states[:-1] == mask_id) & (states[1:] != mask_id)  # [T, B, L]
    changed = (states[:-1] != states[1:]).any(dim=2)  # [T, B]
    row_step = changed.long().cumsum(dim=0) - 1  # [T, B]: the row's own index of each changing step
    candidate = torch.where(accepted, row_step[..., None], torch.full_like(accepted, -1, dtype=torch.long))
    return candidate.max(dim=0).values


def record_trajectories(model: LoopedTransformer, task: Task, tokenizer, examples: Sequence[Example],
                        spec: SamplerConfig = RECORDING_SPEC, temperatures: Sequence[float] = RETRY_TEMPERATURES,
                        batch_size: int = 64, seed: int = 0, dist: DistInfo | None = None) -> list[Trajectory]:
    """Decode every prompt with `spec`, retrying the ones the verifier rejects at each next temperature.

    Prompts go in batches of `batch_size`; within a batch all are decoded at the first temperature, the rejected
    ones together at the second, and so on; prompts no temperature solves are dropped. Rows decode independently, so
    batching does not change any row's decode. Returns the accepted trajectories ordered by example index. Runs on
    the model's device; the generator of attempt a of batch b is seeded with seed + b * len(temperatures) + a.

    tokenizer: provides encode/decode, mask_id, pad_id and eos_id (the model's tokenizer).
    dist: under torchrun (every rank calls with the same arguments), rank r decodes the batches b with
        b mod world_size = r and the ranks then exchange their trajectories, so each rank returns the list one
        process would (the same batches with the same seeds) after a 1/world_size share of the decoding. Gathering
        one recording, rather than every rank recording all prompts, also keeps the ranks' training rows identical
        where device kernels are not bit-reproducible.
    """
    if not temperatures:
        raise UserError("need at least one temperature to record WINO+ trajectories")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    rows = encode_task(task, list(examples), tokenizer)
    canvas = answer_canvas(rows, tokenizer.mask_id).to(device)
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    accepted: list[Trajectory] = []
    for batch_number, batch_start in enumerate(range(0, len(examples), batch_size)):
        if batch_number % world_size != rank:
            continue
        pending = list(range(batch_start, min(batch_start + batch_size, len(examples))))
        for attempt, temperature in enumerate(temperatures):
            if not pending:
                break
            # One distinct seed per (batch, attempt).
            generator = torch.Generator(device=device).manual_seed(seed + batch_number * len(temperatures) + attempt)
            recorded = decode_recorded(model, canvas[pending], tokenizer.mask_id,
                                       dataclasses.replace(spec, temperature=temperature), generator)
            steps, windows = recorded.accept_steps(tokenizer.mask_id), recorded.window_index(tokenizer.mask_id)
            final = recorded.states[-1]
            answers = decode_answers(final, tokenizer, rows.prompt_len)
            still_pending = []
            for row, (index, answer) in enumerate(zip(pending, answers)):
                if task.verify(examples[index].prompt, answer):
                    accepted.append(Trajectory(final[row], steps[row], windows[row], index, temperature))
                else:
                    still_pending.append(index)
            pending = still_pending
    if dist is not None:
        accepted = [trajectory for part in all_gather_objects(accepted, dist) for trajectory in part]
    return sorted(accepted, key=lambda trajectory: trajectory.example_index)


def build_rows(trajectories: Sequence[Trajectory], mask_id: int) -> WinoPlusRows:
    """One row per (trajectory, step with at least one final acceptance); see `WinoPlusRows`. All trajectories
    must have the same length L."""
    if not trajectories:
        raise UserError("no WINO+ trajectories to build rows from (did the verifier reject every decode?)")
    inputs, clean, targets, block = [], [], [], []
    for trajectory in trajectories:
        generated = trajectory.accept_step >= 0
        for step in trajectory.accept_step[generated].unique().tolist():
            target = trajectory.accept_step == step
            hidden = generated & (trajectory.accept_step >= step)
            current_window = trajectory.window_index[target][0]
            inputs.append(trajectory.tokens.masked_fill(hidden, mask_id))
            clean.append(trajectory.tokens)
            targets.append(target)
            block.append(trajectory.window_index == current_window)
    return WinoPlusRows(torch.stack(inputs), torch.stack(clean), torch.stack(targets), torch.stack(block))


# ------------------------------------------------------------------------------------------------------ loss


@dataclass
class WinoPlusLossWeights:
    """w_min: weight of entropy minimisation on correct-but-unsure targets (max prob < unsure_below);
    w_max: weight of entropy maximisation on wrong-yet-confident masked non-targets of the current block
    (max prob > confident_above)."""

    w_min: float = 0.1
    w_max: float = 1.0
    unsure_below: float = 0.9
    confident_above: float = 0.6


@dataclass
class WinoPlusLoss:
    """total: the scalar to minimise; ce, entropy_min, entropy_max: the three terms, each a mean over its own slots
    (unweighted, detached), and the number of slots each entropy term covered."""

    total: Tensor
    ce: float
    entropy_min: float
    entropy_max: float
    unsure_targets: int
    confident_errors: int


def _mean_over(values: Tensor, where: Tensor) -> Tensor:
    """Mean of values [N, L] over the slots where `where` [N, L] is set (0, with a zero gradient, when none is)."""
    return torch.where(where, values, torch.zeros_like(values)).sum() / where.sum().clamp(min=1)


def wino_plus_loss(log_probs: Tensor, rows: WinoPlusRows, mask_id: int,
                   weights: WinoPlusLossWeights = WinoPlusLossWeights()) -> WinoPlusLoss:
    """The three-term WINO+ objective (module docstring, step 3).

    log_probs: float [N, L, V], the model's SUBS log-probs on rows.inputs. Returns WinoPlusLoss.
    """
    with torch.no_grad():
        top_prob, top_token = log_probs.max(dim=-1)
        top_prob = top_prob.exp()
        correct = top_token == rows.clean
        unsure_targets = rows.targets & correct & (top_prob < weights.unsure_below)
        other_masked = rows.block & (rows.inputs == mask_id) & ~rows.targets
        confident_errors = other_masked & ~correct & (top_prob > weights.confident_above)
    nll = -log_probs.gather(-1, rows.clean[..., None]).squeeze(-1)
    entropy = predictive_entropy(log_probs)
    ce = _mean_over(nll, rows.targets)
    entropy_min = _mean_over(entropy, unsure_targets)
    entropy_max = _mean_over(entropy, confident_errors)
    total = ce + weights.w_min * entropy_min - weights.w_max * entropy_max
    return WinoPlusLoss(total=total, ce=float(ce.detach()), entropy_min=float(entropy_min.detach()),
                        entropy_max=float(entropy_max.detach()),
                        unsure_targets=int(unsure_targets.sum()), confident_errors=int(confident_errors.sum()))


# ------------------------------------------------------------------------------------------------ fine-tuning


@dataclass
class SupervisedAnchor:
    """The ordinary supervised task loss mixed into WINO+ fine-tuning: each step adds `weight` x the model's NELBO
    (nats per answer token) on `batch_size` clean task rows, at the same loop count as the WINO+ batch.

    tokens: int64 [M, L], clean task rows (e.g. `encode_task(...).tokens` of training prompts);
    noisable: bool [M, L], the columns the diffusion may mask and scores (the answer: `~TaskBatch.prompt_mask`);
    diffusion: the checkpoint's objective (e.g. `MaskedDiffusion(mask_id)` with its schedule).
    """

    tokens: Tensor
    noisable: Tensor
    diffusion: MaskedDiffusion
    weight: float = 1.0
    batch_size: int = 32


class WinoPlusObjective(Objective):
    """The three-term WINO+ loss on `WinoPlusBatch`es, plus the supervised anchor's NELBO when the batch carries
    anchor rows (`SupervisedAnchor`): loss = WINO+ + anchor_weight * NELBO. Each term is a mean over the batch's
    own positions (module docstring, step 3); the trainer weights micro-batches by their rows."""

    def __init__(self, mask_id: int, weights: WinoPlusLossWeights = WinoPlusLossWeights(),
                 anchor_diffusion: MaskedDiffusion | None = None, anchor_weight: float = 1.0):
        self.mask_id, self.weights = mask_id, weights
        self.anchor_diffusion, self.anchor_weight = anchor_diffusion, anchor_weight

    def loss(self, denoiser: ModelCall, batch: WinoPlusBatch, generator: torch.Generator) -> LossTerms:
        logits = model_logits(denoiser)
        rows = batch.rows
        log_probs = subs_log_probs(logits(rows.inputs), self.mask_id)
        terms = wino_plus_loss(log_probs, rows, self.mask_id, self.weights)
        total = terms.total
        metrics = {"ce": terms.ce, "entropy_min": terms.entropy_min, "entropy_max": terms.entropy_max}
        if batch.anchor is not None:
            nelbo = self.anchor_diffusion.nelbo(logits, batch.anchor.x0, generator, batch.anchor.noisable).loss
            total = total + self.anchor_weight * nelbo
            metrics["nelbo"] = float(nelbo.detach())
        count = len(rows)
        return LossTerms(total=total * count, count=torch.tensor(float(count)),
                         metrics={name: torch.tensor(value * count) for name, value in metrics.items()})


def finetune_wino_plus(model: LoopedTransformer, rows: WinoPlusRows, mask_id: int, steps: int, lr: float = 1e-4,
                       batch_size: int = 32, max_loops: int | None = None,
                       weights: WinoPlusLossWeights = WinoPlusLossWeights(), weight_decay: float = 0.0,
                       grad_clip: float = 1.0, seed: int = 0, anchor: SupervisedAnchor | None = None,
                       early_stopping: EarlyStopping | None = None, out_dir: str | Path | None = None,
                       log_every: int = 10, grad_accum: int = 1, dist: DistInfo | None = None
                       ) -> list[dict[str, float]]:
    """Fine-tune `model` in place on WINO+ rows with the `Trainer` (AdamW at a constant rate, no EMA); returns one
    log dict per update of this call (loss, ce, entropy_min, entropy_max, loops, lr, grad_norm, and nelbo with an
    anchor).

    Each update reads `grad_accum` micro-batches of `batch_size` rows of a seeded permutation (`RowSource`) and,
    for a looped model, one loop count S ~ U{1, ..., max_loops} (default: the model's training S_max) drawn from
    (seed, step), so the model stays usable at every depth it was trained for. Under torchrun (`dist`, default
    `setup_distributed` of the model's device) every rank passes the same `rows` and anchor and reads its own
    `batch_size` rows of each global batch of batch_size x world_size rows, so the ranks split the data as
    `loopdlm train` does: as each WINO+ term is a mean over its micro-batch's own positions, 2 ranks x batch B
    equal 1 process x batch B x grad_accum 2 (not 1 process x batch 2B). Only rank 0 writes into `out_dir`. With `anchor`, the loss also carries the supervised NELBO
    on anchor rows; with `early_stopping`, training may stop early and the best-scoring weights are restored
    (see `EarlyStopping`). With `out_dir`, the run folder gets metrics.jsonl (a train record every `log_every`
    updates) and a checkpoint at the end, and a call on a folder holding checkpoints resumes from the latest (the
    same updates as an uninterrupted run). The model stays on its device and is left in the train/eval mode it
    came in.
    """
    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise UserError(f"steps, batch_size and grad_accum must be >= 1, got {steps}, {batch_size}, {grad_accum}")
    if anchor is not None and (anchor.batch_size < 1 or anchor.tokens.shape != anchor.noisable.shape):
        raise UserError("the supervised anchor needs batch_size >= 1 and noisable of the tokens' shape")
    config = RunConfig()
    config.model = dataclasses.replace(model.config, max_loops=max_loops or model.config.max_loops)
    device = next(model.parameters()).device
    train = config.train
    train.steps, train.lr, train.batch_size, train.weight_decay, train.grad_clip = steps, lr, batch_size, \
        weight_decay, grad_clip
    train.grad_accum = grad_accum
    train.seed, train.warmup_steps, train.lr_schedule, train.ema_decay = seed, 0, "constant", 0.0
    train.eval_every, train.ckpt_every, train.log_every, train.device = 0, 0, log_every, str(device)
    dist = dist if dist is not None else setup_distributed(train.device)
    source = RowSource(rows, batch_size, seed, dist.rank, dist.world_size)
    if anchor is not None:
        anchor_source = RowSource(TensorRows(anchor.tokens, anchor.noisable), anchor.batch_size, seed + 1,
                                  dist.rank, dist.world_size)
        source = PairedSource(source, anchor_source, lambda main, extra: WinoPlusBatch(main.rows, extra))
    objective = WinoPlusObjective(mask_id, weights, anchor.diffusion if anchor else None,
                                  anchor.weight if anchor else 1.0)
    was_training = model.training
    model.train()
    trainer = Trainer(config, model, objective, source, None, out_dir, dist=dist,
                      callbacks=[early_stopping] if early_stopping is not None else ())
    result = trainer.fit()
    model.train(was_training)
    return result.records
