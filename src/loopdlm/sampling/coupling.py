"""CoDD at sampling time: tokens committed in the same step are coupled through an HMM prior.

Two strategies over the shared loop (`engine.generate`), both driven by a trained `HMMPrior` (sampling/codd.py):

* `CoDDTransform` is a `LogitTransform`. Each step it sharpens the denoiser's distribution by 1/tau (only when
  tau < 1), samples one hidden path z of the HMM given that soft evidence (observed tokens are hard evidence), and
  returns log_softmax(log q~_i + log E[z_i, .]) at every masked slot, q~ the sharpened q, as the reference does
  (liuanji/CoDD, `apply_pc_logits`); the unchanged selector then draws and ranks tokens by that distribution, so
  the tokens it commits are coupled through z. `combine_with_sharpened=False` adds log E[z] to the denoiser's own
  q instead (see `HMMPrior.coupled_log_probs`). Passed as `sample(..., transforms=(CoDDTransform(...),))`, it
  composes with every selector, loop policy and denoiser (a KV-cached block denoiser returns window log-probs like
  any other).
* `AnyOrderCoDDSelector` wraps a selector. The inner selector decides which slots this step commits; the wrapper then
  commits them one at a time, most confident first, each token drawn from the exact conditional of the product of
  experts given every token committed so far (this step's included). Each commit re-queries only the HMM
  (`update_evidence` + forward-backward), never the transformer.

Windows: the HMM works on the engine's window (the decoding block, `block_length`; the whole generation region when
block_length is 0). When that window is longer than the W the prior was trained on, the window is cut into
consecutive chunks of W positions (the last one may be shorter) and each chunk is coupled on its own, with its own
gamma gate: the HMM never saw longer chains, and its chain cannot carry information across chunks anyway.

Randomness: the HMM's draws come from the strategy's own generator (seeded by `seed`), never from the sampler's. So
adding CoDD leaves the sampler's candidate and selector draws where they were: with a one-state, uniform-emission
prior the transform reproduces the factorised sampler token for token when tau >= 1 (no sharpening) or with
combine_with_sharpened=False, and the factorised sampler on q^(1/tau) otherwise.

Persistence: `save_codd_layer` / `load_codd_layer` store the prior on its own (safetensors + codd_config.json with
n_states, vocab_size, window and the tokenizer fingerprint) and load it beside any checkpoint whose vocabulary and
tokenizer match.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from loopdlm.errors import UserError
from loopdlm.sampling.codd import HMMPrior, load_prior, save_prior, sharpen, should_couple
from loopdlm.sampling.engine import Decision, Selector, StepContext, gumbel_candidates


def window_chunks(width: int, window: int | None) -> list[slice]:
    """Consecutive slices of at most `window` positions covering [0, width); one slice when window is None."""
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    step = width if window is None else window
    return [slice(start, min(start + step, width)) for start in range(0, width, max(step, 1))]


class _OwnGenerator:
    """A torch.Generator per device, seeded once, so CoDD's draws never shift the sampler's random stream."""

    def __init__(self, seed: int):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        """The generator for `device` (created and seeded on first use)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


def _check_options(temperature: float, gamma: float, window: int | None) -> None:
    if not temperature > 0:
        raise UserError(f"CoDD temperature tau must be > 0, got {temperature}")
    if not gamma >= 0:
        raise UserError(f"CoDD gamma (maximum mask ratio) must be >= 0, got {gamma}")
    if window is not None and window < 1:
        raise UserError(f"CoDD window must be >= 1, got {window}")


class CoDDTransform:
    """LogitTransform coupling the slots of each window through one sampled HMM path (CoDD, per step).

    Args:
        prior: the trained HMMPrior, on the device the sampler runs on; its vocab_size must equal the model's.
        temperature: tau > 0; the path is sampled from the evidence of q^(1/tau) (the paper uses 0.1-0.2); tau >= 1
            does not sharpen (the reference tempers only when 0 < tau < 1).
        gamma: couple a (chunk of a) window only while its mask ratio is strictly below gamma (paper: 0.3-0.7);
            0 never couples (the input tensor is returned as is), any value above 1 always does.
        window: the W the prior was trained on; longer engine windows are coupled in chunks of W. None: no chunking.
        chunk_size: vocabulary chunk of the soft-evidence computation (bounds memory for large V); None = all of V.
        combine_with_sharpened: True (default, the reference's rule): add log E[z] to the sharpened q, so the
            selector draws and ranks by the sharpened, coupled distribution. False: add it to the denoiser's own q,
            so the selector's confidences stay unsharpened (e.g. for a threshold selector whose tau should keep its
            meaning at any CoDD temperature). See HMMPrior.coupled_log_probs.
        seed: seed of the transform's own generator (see the module docstring).
    """

    def __init__(self, prior: HMMPrior, temperature: float = 0.1, gamma: float = 0.5, window: int | None = None,
                 chunk_size: int | None = None, combine_with_sharpened: bool = True, seed: int = 0):
        _check_options(temperature, gamma, window)
        self.prior = prior
        self.temperature = temperature
        self.gamma = gamma
        self.window = window
        self.chunk_size = chunk_size
        self.combine_with_sharpened = combine_with_sharpened
        self._generator = _OwnGenerator(seed)

    def __call__(self, log_probs: Tensor, tokens: Tensor, selectable: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
        """log_probs float [B, W, V]; tokens int64 [B, W] (the window of x_t); selectable bool [B, W] (masked slots).

        Returns [B, W, V] in log_probs' dtype: coupled log-probs at the masked slots of every active (chunk of a)
        row, the input elsewhere; the input object itself when nothing is coupled. `generator` (the sampler's) is
        deliberately not used.
        """
        if self.gamma <= 0:
            return log_probs
        out = None
        for part in window_chunks(log_probs.shape[1], self.window):
            observed = ~selectable[:, part]
            active = should_couple(observed, self.gamma) & selectable[:, part].any(dim=1)
            if not bool(active.any()):
                continue
            coupled = self.prior.coupled_log_probs(
                log_probs[active, part], tokens[active, part], observed[active], self.temperature,
                self._generator.on(log_probs.device), self.chunk_size, self.combine_with_sharpened)
            if out is None:
                out = log_probs.clone()
            out[active, part] = coupled.to(out.dtype)
        return log_probs if out is None else out


class AnyOrderCoDDSelector:
    """Selector wrapper: commits the inner selector's slots one at a time from the exact CoDD conditional.

    Per step and per active (chunk of a) row: the inner selector picks the slots to commit (so the number of commits
    per step, and the selector's own rule, are unchanged); those slots are then filled in order of decreasing
    confidence, each with a token drawn from p^(x_i | x_t, tokens committed before it), where p^ is the product of
    experts HMM(x) * prod_j q_j(x_j) with the other masked slots' evidence taken from the sharpened q^(1/tau) and
    slot i's own factor the sharpened q too (the denoiser's own q with combine_with_sharpened=False). The slots and
    their order come from the inner selector's view of the denoiser's distribution. After each commit the
    evidence of that slot becomes hard (`update_evidence`), so the next draw is conditioned on it; no extra
    transformer pass is made. Rows (chunks) outside the gamma gate keep the engine's factorised candidates.

    Use it instead of, not together with, CoDDTransform: it reads ctx.log_probs as the denoiser's distribution.
    The drawn tokens are returned in `Decision.tokens` (the engine commits them instead of the candidates).

    Args:
        inner: any selector (its `steps`, if it has one, is exposed for the engine's iteration guard).
        prior, temperature (tau), gamma, window, chunk_size, combine_with_sharpened, seed: as for CoDDTransform.
        sampling_temperature / top_p: how each token is drawn from its conditional, like the sampler's own
            temperature and top_p (0 = argmax).
    """

    def __init__(self, inner: Selector, prior: HMMPrior, temperature: float = 0.1, gamma: float = 0.5,
                 window: int | None = None, chunk_size: int | None = None, combine_with_sharpened: bool = True,
                 sampling_temperature: float = 1.0, top_p: float = 1.0, seed: int = 0):
        _check_options(temperature, gamma, window)
        self.inner = inner
        self.prior = prior
        self.temperature = temperature
        self.gamma = gamma
        self.window = window
        self.chunk_size = chunk_size
        self.combine_with_sharpened = combine_with_sharpened
        self.sampling_temperature = sampling_temperature
        self.top_p = top_p
        self._generator = _OwnGenerator(seed)
        if hasattr(inner, "steps"):
            self.steps = inner.steps

    def start_window(self, masked_counts: Tensor) -> None:
        """Forwarded to the inner selector."""
        self.inner.start_window(masked_counts)

    def select(self, ctx: StepContext) -> Decision:
        """The inner selector's decision; the committed slots of active rows get sequentially drawn tokens."""
        decision = self.inner.select(ctx)
        commit = decision.commit & ctx.selectable
        if self.gamma <= 0 or not bool(commit.any()):
            return decision
        tokens = (decision.tokens if decision.tokens is not None else ctx.candidates).clone()
        for part in window_chunks(commit.shape[1], self.window):
            observed = ~ctx.selectable[:, part]
            active = should_couple(observed, self.gamma) & commit[:, part].any(dim=1)
            if not bool(active.any()):
                continue
            drawn = self._commit_one_at_a_time(ctx.log_probs[active, part], ctx.tokens[active, part],
                                               observed[active], commit[active, part], ctx.confidence[active, part])
            tokens[active, part] = torch.where(commit[active, part], drawn, tokens[active, part])
        return Decision(commit=decision.commit, remask=decision.remask, tokens=tokens)

    @torch.no_grad()
    def _commit_one_at_a_time(self, log_q: Tensor, tokens: Tensor, observed: Tensor, commit: Tensor,
                              confidence: Tensor) -> Tensor:
        """Sequential exact draws for one chunk. log_q [b, w, V]; tokens [b, w]; observed, commit bool [b, w];
        confidence [b, w]. Returns int64 [b, w] holding the drawn tokens at the committed slots."""
        prior, generator = self.prior, self._generator.on(log_q.device)
        sharpened = sharpen(log_q, self.temperature)
        own_factor = sharpened if self.combine_with_sharpened else log_q
        evidence = prior.emission_evidence(sharpened, tokens, observed, self.chunk_size)
        order = confidence.double().masked_fill(~commit, -math.inf).argsort(dim=1, descending=True, stable=True)
        counts = commit.sum(dim=1)
        rows = torch.arange(len(tokens), device=tokens.device)
        tokens, observed = tokens.clone(), observed.clone()
        for rank in range(int(counts.max())):
            live = counts > rank
            position = order[:, rank]
            marginals = prior.token_log_marginals(evidence, own_factor, tokens, observed, self.chunk_size)
            drawn = gumbel_candidates(marginals[rows, position].unsqueeze(1), self.sampling_temperature,
                                      self.top_p, generator).squeeze(1)
            newly = torch.zeros_like(observed)
            newly[rows[live], position[live]] = True
            tokens = torch.where(newly, drawn.unsqueeze(1), tokens)
            evidence = prior.update_evidence(evidence, tokens, newly)
            observed |= newly
        return tokens


# ----------------------------------------------------------------------------------------------- persistence


def save_codd_layer(prior: HMMPrior, directory: str | Path, window: int, tokenizer_fingerprint: str | None,
                    metadata: dict | None = None) -> Path:
    """Write the prior on its own into `directory`: hmm_prior.safetensors + codd_config.json holding n_states,
    vocab_size, window, tokenizer_fingerprint (None when unknown) and every key of `metadata` (JSON values, e.g.
    the checkpoint it was trained on, loops, steps). Returns the folder."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    extra = {**(metadata or {}), "window": int(window), "tokenizer_fingerprint": tokenizer_fingerprint}
    save_prior(prior, directory, extra)
    return Path(directory)


def load_codd_layer(directory: str | Path, vocab_size: int, tokenizer_fingerprint: str | None = None,
                    device: torch.device | str | None = None) -> tuple[HMMPrior, dict]:
    """Load a prior written by save_codd_layer for a model with `vocab_size` ids (mask included) and, when given,
    the tokenizer with `tokenizer_fingerprint`. Returns (HMMPrior on `device` in eval mode, config dict).

    Raises UserError (one line) when the folder is missing or corrupt, has no window, or was trained for another
    vocabulary or tokenizer.
    """
    prior, config = load_prior(directory, device)
    if prior.vocab_size != vocab_size:
        raise UserError(f"CoDD prior {directory} was trained for a vocabulary of {prior.vocab_size} ids but the model "
                        f"has {vocab_size}; train one for this checkpoint with `loopdlm train-codd`")
    saved_fingerprint = config.get("tokenizer_fingerprint")
    if None not in (tokenizer_fingerprint, saved_fingerprint) and saved_fingerprint != tokenizer_fingerprint:
        raise UserError(f"CoDD prior {directory} was trained with a different tokenizer than the checkpoint's "
                        f"(fingerprint {saved_fingerprint[:12]} vs {tokenizer_fingerprint[:12]})")
    window = config.get("window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise UserError(f"corrupt CoDD config in {directory}: 'window' must be a positive integer, got {window!r}")
    return prior, config


__all__ = ["AnyOrderCoDDSelector", "CoDDTransform", "load_codd_layer", "save_codd_layer", "window_chunks"]
