"""Log-likelihood of a continuation given a prompt under a masked diffusion model (MDLM or BD3-LM).

The prompt is never masked. Three estimators share one batched scorer:

* `elbo`: the Monte-Carlo ELBO with stratified mask counts (the estimator of LLaDA, dllm and Dream). For a group of
  n continuation tokens draw a count l in {1..n}, mask l of them uniformly at random and weight their log-probs by
  n / l. Its expectation, sum_l f(l) / l with f(l) the mean log-prob of l masked tokens, is exactly the
  continuous-time NELBO of the log-linear schedule with eps = 0 (integrate the Binomial(n, t) mask count against
  the weight 1/t). Sample k of K draws its count from the stratum [k/K, (k+1)/K) of the counts, so the K counts
  cover 1..n evenly. MDLM has one group (the whole continuation); a block-diffusion checkpoint has one group per
  block and scores every block's conditional given the clean earlier blocks in one [x_t ; x_0] pass, so its ELBO
  is the block NELBO sum_b ELBO(x^b | x^{<b}).
* `chain_rule`: deterministic, no sampling. Row j masks, in every group, the continuation tokens from the j-th on
  and scores the j-th: the exact log-probability of decoding the continuation left to right one token per step
  (n forward rows for MDLM, at most L' for block diffusion). It also says whether every token was the argmax.
* `rolling`: a whole text in disjoint windows of the context length, each scored unconditionally with one of the
  two estimators above (the quantity `loopdlm eval` reports on a corpus), summed over windows.

The standard error of the ELBO is the i.i.d. formula std / sqrt(K) over the K samples; stratification makes the
true error smaller, so it is conservative.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from loopdlm.diffusion.block import dense_block_diffusion_mask
from loopdlm.diffusion.masked import subs_log_probs
from loopdlm.diffusion.schedules import stratified_times
from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer

#: (prompt token ids, continuation token ids)
Pair = tuple[Sequence[int], Sequence[int]]


@dataclass
class ContinuationScore:
    """log_likelihood: estimate of log p(continuation | prompt) in nats (the ELBO, or the exact left-to-right
    log-probability); stderr: its Monte-Carlo standard error (0 when deterministic); greedy: every continuation
    token was the argmax of its conditional (chain rule only, else None); tokens: continuation tokens scored."""

    log_likelihood: float
    stderr: float
    tokens: int
    greedy: bool | None = None


@dataclass
class ScoringStats:
    """Accounting over every call: batched forward passes, rows run, core applications summed over rows,
    continuation tokens scored and wall time in seconds."""

    forward_passes: int = 0
    rows: int = 0
    core_applications: float = 0.0
    tokens: int = 0
    wall_time: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"forward_passes": self.forward_passes, "rows": self.rows,
                "core_applications": self.core_applications, "tokens_scored": self.tokens,
                "tokens_per_s": self.tokens / self.wall_time if self.wall_time > 0 else 0.0,
                "wall_time_s": self.wall_time}


@dataclass
class _Row:
    """One model input: x_t and x_0 (int64 [L]), the scored positions and their weights, and which pair and
    sample the weighted log-probs add to."""

    xt: Tensor
    x0: Tensor
    positions: Tensor
    weights: Tensor
    pair: int
    sample: int


@dataclass
class _Accumulator:
    """Per pair, per sample: the weighted log-prob sum, and whether every scored token was the argmax."""

    totals: list[list[float]]
    greedy: list[bool] = field(default_factory=list)


class ContinuationScorer:
    """Scores continuations with `model` run at `loops` core applications.

    Args:
        model: the denoiser (its device is used).
        mask_id: the mask token id.
        context: the longest input (the training sequence length); prompts are cut from the left to fit.
        loops: S (core applications per forward pass).
        block_size: L' of a block-diffusion checkpoint (None = MDLM).
        batch_rows: rows per forward pass.
    """

    def __init__(self, model: LoopedTransformer, mask_id: int, context: int, loops: int = 1,
                 block_size: int | None = None, batch_rows: int = 32):
        if loops < 1:
            raise UserError(f"loops must be >= 1, got {loops}")
        if batch_rows < 1:
            raise UserError(f"batch size must be >= 1, got {batch_rows}")
        if block_size is not None and block_size < 1:
            raise UserError(f"block size must be >= 1, got {block_size}")
        self.model = model
        self.mask_id = mask_id
        self.context = context
        self.loops = loops
        self.block_size = block_size if block_size is not None and block_size < context else None
        self.batch_rows = batch_rows
        self.device = next(model.parameters()).device
        self.stats = ScoringStats()

    # ------------------------------------------------------------------------------------------- estimators
    @torch.no_grad()
    def elbo(self, pairs: Sequence[Pair], samples: int, generator: torch.Generator | None = None
             ) -> list[ContinuationScore]:
        """Monte-Carlo ELBO of each continuation with `samples` stratified mask-count draws (see the module)."""
        if samples < 1:
            raise UserError(f"mc_samples must be >= 1, got {samples}")
        fitted = [self._fit(prompt, continuation) for prompt, continuation in pairs]
        rows = (row for index, (x0, start) in enumerate(fitted)
                for row in self._elbo_rows(index, x0, start, samples, generator))
        results = []
        for (x0, start), values in zip(fitted, self._collect(self._run(rows), len(fitted), samples).totals):
            mean = sum(values) / samples
            spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (samples - 1)) if samples > 1 else math.nan
            results.append(ContinuationScore(mean, spread / math.sqrt(samples), len(x0) - start))
        return results

    @torch.no_grad()
    def chain_rule(self, pairs: Sequence[Pair]) -> list[ContinuationScore]:
        """Exact log-probability of each continuation decoded left to right, one token per step (see the module)."""
        fitted = [self._fit(prompt, continuation) for prompt, continuation in pairs]
        rows = (row for index, (x0, start) in enumerate(fitted) for row in self._chain_rows(index, x0, start))
        accumulated = self._collect(self._run(rows), len(fitted), 1)
        return [ContinuationScore(values[0], 0.0, len(x0) - start, greedy)
                for (x0, start), values, greedy in zip(fitted, accumulated.totals, accumulated.greedy)]

    def rolling(self, texts: Sequence[Sequence[int]], samples: int | None,
                generator: torch.Generator | None = None) -> list[ContinuationScore]:
        """log-likelihood of whole token sequences in disjoint windows of `context` tokens, each scored without
        a prompt by the ELBO with `samples` draws, or by the chain rule when `samples` is None. Standard errors
        of the windows add in quadrature."""
        windows = [(owner, text[start:start + self.context]) for owner, text in enumerate(texts)
                   for start in range(0, len(text), self.context)]
        pairs = [((), window) for _, window in windows]
        scores = self.chain_rule(pairs) if samples is None else self.elbo(pairs, samples, generator)
        totals = [[0.0, 0.0, 0] for _ in texts]
        for (owner, _), score in zip(windows, scores):
            totals[owner][0] += score.log_likelihood
            totals[owner][1] += score.stderr ** 2
            totals[owner][2] += score.tokens
        return [ContinuationScore(value, math.sqrt(variance), tokens) for value, variance, tokens in totals]

    # ------------------------------------------------------------------------------------------- rows
    def _fit(self, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[Tensor, int]:
        """(prompt ++ continuation as int64 [L], index where the continuation starts), the prompt cut from the
        left so that L <= context."""
        if not continuation:
            raise UserError("cannot score an empty continuation")
        if len(continuation) > self.context:
            raise UserError(f"continuation of {len(continuation)} tokens exceeds the model's context of "
                            f"{self.context} tokens")
        prompt = list(prompt)[max(0, len(prompt) + len(continuation) - self.context):]
        return torch.tensor(prompt + list(continuation), dtype=torch.long), len(prompt)

    def _groups(self, length: int, start: int) -> list[Tensor]:
        """Continuation positions per group: all of them (MDLM) or per block of L' (block diffusion)."""
        positions = torch.arange(start, length)
        if self.block_size is None:
            return [positions]
        blocks = positions // self.block_size
        return [positions[blocks == block] for block in blocks.unique()]

    def _elbo_rows(self, pair: int, x0: Tensor, start: int, samples: int, generator: torch.Generator | None):
        groups = self._groups(len(x0), start)
        # counts[g, k]: masked tokens of group g in sample k, stratified over k.
        counts = [(stratified_times(samples, 0.0, generator, "cpu") * len(g)).long().clamp(0, len(g) - 1) + 1
                  for g in groups]
        for sample in range(samples):
            positions, weights = [], []
            for group, group_counts in zip(groups, counts):
                count = int(group_counts[sample])
                order = torch.rand(len(group), generator=generator).argsort()
                positions.append(group[order[:count]])
                weights.append(torch.full((count,), len(group) / count))
            positions = torch.cat(positions)
            yield _Row(x0.index_fill(0, positions, self.mask_id), x0, positions, torch.cat(weights), pair, sample)

    def _chain_rows(self, pair: int, x0: Tensor, start: int):
        groups = self._groups(len(x0), start)
        for step in range(max(len(g) for g in groups)):
            masked = torch.cat([g[step:] for g in groups])
            scored = torch.stack([g[step] for g in groups if step < len(g)])
            yield _Row(x0.index_fill(0, masked, self.mask_id), x0, scored, torch.ones(len(scored)), pair, 0)

    # ------------------------------------------------------------------------------------------- model
    def _run(self, rows) -> list[tuple[_Row, float, bool]]:
        """Every row's weighted log-prob sum and whether all its scored tokens were the argmax, in `batch_rows`
        batches."""
        out, batch = [], []
        for row in rows:
            batch.append(row)
            if len(batch) == self.batch_rows:
                out += self._forward(batch)
                batch = []
        if batch:
            out += self._forward(batch)
        return out

    def _collect(self, results, pairs: int, samples: int) -> _Accumulator:
        accumulated = _Accumulator(totals=[[0.0] * samples for _ in range(pairs)], greedy=[True] * pairs)
        for row, value, greedy in results:
            accumulated.totals[row.pair][row.sample] += value
            accumulated.greedy[row.pair] &= greedy
        return accumulated

    def _forward(self, rows: list[_Row]) -> list[tuple[_Row, float, bool]]:
        started = time.perf_counter()
        length = max(len(row.x0) for row in rows)
        if self.block_size is not None:
            length = -(-length // self.block_size) * self.block_size
        xt = torch.full((len(rows), length), self.mask_id, dtype=torch.long)
        x0 = xt.clone()
        keep = torch.zeros(len(rows), length, dtype=torch.bool)
        for index, row in enumerate(rows):
            xt[index, :len(row.x0)], x0[index, :len(row.x0)], keep[index, :len(row.x0)] = row.xt, row.x0, True
        log_probs = subs_log_probs(self._logits(xt.to(self.device), x0.to(self.device), keep.to(self.device)),
                                   self.mask_id)
        results = []
        for index, row in enumerate(rows):
            scored = log_probs[index, row.positions.to(self.device)]
            targets = row.x0[row.positions].to(self.device)
            value = float((scored.gather(-1, targets[:, None]).squeeze(-1) * row.weights.to(self.device)).sum())
            results.append((row, value, bool((scored.argmax(-1) == targets).all())))
        self.stats.forward_passes += 1
        self.stats.rows += len(rows)
        self.stats.tokens += sum(len(row.positions) for row in rows)
        self.stats.wall_time += time.perf_counter() - started
        return results

    def _logits(self, xt: Tensor, x0: Tensor, keep: Tensor) -> Tensor:
        """Logits of x_t [B, L, V]; pad columns (keep False) are hidden from every query. Block diffusion runs
        [x_t ; x_0] under the block-causal mask, so each block is conditioned on the clean blocks before it."""
        length = xt.shape[1]
        padded = not bool(keep.all())
        if self.block_size is None or length <= self.block_size:
            mask = keep[:, None, None, :] if padded else None
            out = self.model(xt, loops=self.loops, attn_mask=mask)
            logits = out.logits
        else:
            mask = dense_block_diffusion_mask(length, self.block_size, xt.device)
            mask = mask & torch.cat((keep, keep), dim=1)[:, None, None, :]
            positions = torch.arange(length, device=xt.device).repeat(2)[None]
            out = self.model(torch.cat((xt, x0), dim=1), loops=self.loops, position_ids=positions, attn_mask=mask)
            logits = out.logits[:, :length]
        self.stats.core_applications += float(out.core_applications.sum())
        return logits
