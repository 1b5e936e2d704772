"""CoDD's HMM prior: a context-free hidden Markov model coupled to the denoiser as a product of experts.

Over a window of W positions the coupled distribution is

    p^(x | x_t) = p_omega(x) * prod_{masked i} q_i(x_i) / Z,      observed positions clamped to their tokens,

where p_omega is a homogeneous HMM (N hidden states, initial pi, transitions A[i, j] = p(z_{t+1}=j | z_t=i),
emissions E[z, v]) and q_i is the denoiser's per-position distribution. Everything here is exact inference on a
chain, done in log space:

* evidence   e_i(z) = log E[z, x_i] at an observed position, logsumexp_v(log q_i(v) + log E[z, v]) at a masked one
  (the masked product is streamed over vocabulary chunks so no [B, W, V, N] tensor is ever built);
* forward    alpha_i = logmatmul(alpha_{i-1}, log A) + e_i, log Z = logsumexp(alpha_{W-1});
* backward   beta_i = logmatmul(e_{i+1} + beta_{i+1}, log A^T);
* sampling   forward-filter, backward-sample one hidden path z; the sampler then adds log E[z_i, .] to position i.

Log-space matrix products use the max-shifted exp-matmul trick: both operands are shifted by their maxima along the
contracted axis, so each product is a sum of numbers in [0, 1] that contains at least one term of exactly 1 whenever
the maxima coincide, and an exactly-zero sum (all contributions -inf) comes back as -inf with a zero gradient.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from loopdlm.errors import UserError

CONFIG_FILENAME = "codd_config.json"
WEIGHTS_FILENAME = "hmm_prior.safetensors"


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype inference runs in: the caller's, promoted to at least float32 (a bf16 forward pass is too coarse)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _exp_shifted(log_x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """exp(log_x - shift) and the shift (max along `dim`, kept; 0 where that max is -inf so no NaN appears).

    The shift is detached: the log-space result is invariant to it, so its gradient contribution is exactly zero.
    """
    shift = log_x.detach().amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return torch.exp(log_x - shift), shift


def _log_of_shifted(value: Tensor, shift: Tensor) -> Tensor:
    """log(value) + shift, with value >= 0; an exact zero maps to -inf with a zero (not NaN) gradient."""
    tiny = torch.finfo(value.dtype).tiny
    finite = torch.log(value.clamp_min(tiny)) + shift
    return torch.where(value > 0, finite, torch.full_like(finite, -math.inf))


def _log_matmul(log_x: Tensor, log_m: Tensor) -> Tensor:
    """logsumexp_k(log_x[..., k] + log_m[k, j]) for log_x [..., K] and log_m [K, J]; returns [..., J]."""
    exp_x, shift_x = _exp_shifted(log_x, dim=-1)
    exp_m, shift_m = _exp_shifted(log_m, dim=0)
    return _log_of_shifted(exp_x @ exp_m, shift_x + shift_m)


def _log_add_exp(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise log(exp(a) + exp(b)); unlike torch.logaddexp its gradient is 0, not NaN, when both are -inf."""
    shift = torch.maximum(a, b).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return _log_of_shifted(torch.exp(a - shift) + torch.exp(b - shift), shift)


def sharpen(log_q: Tensor, temperature: float) -> Tensor:
    """CoDD's tempered evidence: log_softmax(log_q / tau) when 0 < tau < 1, plain log_softmax(log_q) when tau >= 1.

    Follows the reference (liuanji/CoDD, `apply_pc_logits`), which divides the block's logits by pc_temperature only
    when 0 < pc_temperature < 1: tau never flattens the denoiser's distribution.
    log_q: [..., V] float log-probabilities (or logits). temperature: tau > 0.
    Returns [..., V] in the compute dtype (float32 or float64).
    """
    if not temperature > 0:
        raise UserError(f"CoDD temperature must be > 0, got {temperature}")
    log_q = log_q.to(_compute_dtype(log_q))
    return torch.log_softmax(log_q / temperature if temperature < 1 else log_q, dim=-1)


def should_couple(observed: Tensor, max_mask_ratio: float) -> Tensor:
    """Whether CoDD applies to each window: its masked fraction is strictly below `max_mask_ratio` (gamma).

    observed: [B, W] bool. Returns [B] bool. gamma = 0 never activates; gamma > 1 always does.
    """
    mask_ratio = (~observed).to(torch.float32).mean(dim=-1)
    return mask_ratio < max_mask_ratio


class HMMPrior(nn.Module):
    """Homogeneous HMM over tokens, parameterised by unconstrained logits (softmax-normalised on use).

    Parameters: init_logits [N], trans_logits [N, N] (row i -> next state), emit_logits [N, V]. The model has no
    notion of position, so every method works on any window length W >= 1. Methods compute in the caller's dtype
    promoted to at least float32, on the parameters' device (inputs must live there too).
    """

    def __init__(self, n_states: int, vocab_size: int, init_std: float = 0.5):
        """n_states N >= 1, vocab_size V >= 1; logits start as N(0, init_std^2) so states are distinguishable."""
        super().__init__()
        if n_states < 1 or vocab_size < 1:
            raise UserError(f"HMM prior needs n_states >= 1 and vocab_size >= 1, got {n_states} and {vocab_size}")
        self.n_states = n_states
        self.vocab_size = vocab_size
        self.init_logits = nn.Parameter(torch.randn(n_states) * init_std)
        self.trans_logits = nn.Parameter(torch.randn(n_states, n_states) * init_std)
        self.emit_logits = nn.Parameter(torch.randn(n_states, vocab_size) * init_std)

    @property
    def log_pi(self) -> Tensor:
        """log p(z_0): [N]."""
        return torch.log_softmax(self.init_logits, dim=-1)

    @property
    def log_A(self) -> Tensor:
        """log p(z_{t+1} = j | z_t = i) at [i, j]: [N, N], rows normalised."""
        return torch.log_softmax(self.trans_logits, dim=-1)

    @property
    def log_E(self) -> Tensor:
        """log p(x = v | z) at [z, v]: [N, V], rows normalised."""
        return torch.log_softmax(self.emit_logits, dim=-1)

    # ----------------------------------------------------------------------------------------------- evidence

    def observed_evidence(self, tokens: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Hard evidence log E[z, tokens[b, i]] at every position: tokens [B, W] long in [0, V) -> [B, W, N].

        dtype: the float dtype to return (default: the parameters').
        """
        log_E = self.log_E if dtype is None else self.log_E.to(dtype)
        return log_E.t()[tokens]

    def emission_evidence(
        self, log_q: Tensor | None, tokens: Tensor, observed: Tensor, chunk_size: int | None = None
    ) -> Tensor:
        """Per-position, per-state evidence e_i(z): [B, W, N] in the compute dtype.

        log_q: [B, W, V] float log-probabilities of the denoiser (None only when every position is observed);
        -inf entries (q = 0) are fine. tokens: [B, W] long; only observed positions are read (mask ids elsewhere
        are fine). observed: [B, W] bool. chunk_size: vocabulary chunk of the streamed logsumexp, bounding the
        temporaries to O(B*W*chunk + B*W*N); None computes all of V at once.
        Observed i: log E[z, tokens_i]. Masked i: logsumexp_v(log q_i(v) + log E[z, v]).
        """
        if log_q is None:
            if not bool(observed.all()):
                raise ValueError("emission_evidence needs log_q when some position is masked")
            return self.observed_evidence(tokens)
        dtype = _compute_dtype(log_q)
        hard = self.observed_evidence(tokens.masked_fill(~observed, 0), dtype)
        soft = self._soft_evidence(log_q.to(dtype), chunk_size)
        return torch.where(observed.unsqueeze(-1), hard, soft)

    def _soft_evidence(self, log_q: Tensor, chunk_size: int | None) -> Tensor:
        """logsumexp_v(log_q[b, i, v] + log E[z, v]) for every position: [B, W, V] -> [B, W, N], streamed over V."""
        vocab = log_q.shape[-1]
        if vocab != self.vocab_size:
            raise ValueError(f"log_q has vocabulary {vocab}, the HMM prior has {self.vocab_size}")
        step = vocab if chunk_size is None else chunk_size
        if step < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        log_E = self.log_E.to(log_q.dtype)
        total = None
        for start in range(0, vocab, step):
            chunk = _log_matmul(log_q[..., start : start + step], log_E[:, start : start + step].t())
            total = chunk if total is None else _log_add_exp(total, chunk)
        return total

    def update_evidence(self, evidence: Tensor, tokens: Tensor, newly_observed: Tensor) -> Tensor:
        """Evidence after committing tokens: rows where newly_observed [B, W] is set become hard evidence.

        evidence: [B, W, N]; tokens: [B, W] long. Returns [B, W, N]. This is the cheap re-query of the any-order
        variant: committing a token costs O(N) per position instead of recomputing the O(V*N) soft evidence.
        """
        hard = self.observed_evidence(tokens.masked_fill(~newly_observed, 0), evidence.dtype)
        return torch.where(newly_observed.unsqueeze(-1), hard, evidence)

    # ------------------------------------------------------------------------------------- chain inference

    def _forward(self, evidence: Tensor) -> tuple[Tensor, Tensor]:
        """Predictive messages log p(z_i, e_<i) and forward messages log p(z_i, e_<=i): both [B, W, N]."""
        log_pi = self.log_pi.to(evidence.dtype)
        exp_A, shift_A = _exp_shifted(self.log_A.to(evidence.dtype), dim=0)
        predicted = [log_pi.expand_as(evidence[:, 0])]
        alpha = [predicted[0] + evidence[:, 0]]
        for i in range(1, evidence.shape[1]):
            exp_alpha, shift_alpha = _exp_shifted(alpha[-1], dim=-1)
            predicted.append(_log_of_shifted(exp_alpha @ exp_A, shift_alpha + shift_A))
            alpha.append(predicted[-1] + evidence[:, i])
        return torch.stack(predicted, dim=1), torch.stack(alpha, dim=1)

    def forward_messages(self, evidence: Tensor) -> Tensor:
        """alpha_i(z) = log p(z_i = z, e_0..e_i): evidence [B, W, N] -> [B, W, N]."""
        return self._forward(evidence)[1]

    def backward_messages(self, evidence: Tensor) -> Tensor:
        """beta_i(z) = log p(e_{i+1}..e_{W-1} | z_i = z): evidence [B, W, N] -> [B, W, N] (beta_{W-1} = 0)."""
        exp_A_t, shift_A_t = _exp_shifted(self.log_A.to(evidence.dtype).t(), dim=0)
        beta = [torch.zeros_like(evidence[:, -1])]
        for i in range(evidence.shape[1] - 2, -1, -1):
            exp_next, shift_next = _exp_shifted(evidence[:, i + 1] + beta[-1], dim=-1)
            beta.append(_log_of_shifted(exp_next @ exp_A_t, shift_next + shift_A_t))
        return torch.stack(beta[::-1], dim=1)

    def log_normalizer(self, evidence: Tensor) -> Tensor:
        """log Z = log sum_z p(z) prod_i exp(e_i(z_i)): evidence [B, W, N] -> [B]."""
        return torch.logsumexp(self.forward_messages(evidence)[:, -1], dim=-1)

    def log_prob(
        self,
        x0: Tensor,
        log_q: Tensor,
        observed: Tensor,
        target_mask: Tensor | None = None,
        chunk_size: int | None = None,
    ) -> Tensor:
        """log p^(x0[target] | x_t) under the product of experts: the CoDD training objective, [B].

        x0: [B, W] long clean tokens (observed positions of x_t equal x0 there). log_q: [B, W, V] denoiser
        log-probs. observed: [B, W] bool. target_mask: [B, W] bool, the masked positions scored (default: all
        masked ones); masked positions outside it are marginalised (soft evidence in numerator and Z alike), target
        positions that are observed are simply clamped. Numerator evidence at a target position is
        log E[z, x0_i] + log q_i(x0_i). Differentiable w.r.t. the HMM logits (and log_q).
        """
        targets = ~observed if target_mask is None else target_mask & ~observed
        soft_or_observed = self.emission_evidence(log_q, x0, observed, chunk_size)
        dtype = soft_or_observed.dtype
        log_q_at_x0 = log_q.to(dtype).gather(-1, x0.unsqueeze(-1))
        scored = self.observed_evidence(x0, dtype) + log_q_at_x0
        numerator_evidence = torch.where(targets.unsqueeze(-1), scored, soft_or_observed)
        return self.log_normalizer(numerator_evidence) - self.log_normalizer(soft_or_observed)

    def forward(self, x0: Tensor, log_q: Tensor, observed: Tensor, target_mask: Tensor | None = None) -> Tensor:
        """Alias of log_prob (unchunked), so the training objective is the module's call: [B]."""
        return self.log_prob(x0, log_q, observed, target_mask)

    # ------------------------------------------------------------------------------------------- sampling

    def sample_states(self, evidence: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One hidden path z ~ p(z | evidence) by forward filtering, backward sampling: [B, W, N] -> [B, W] long.

        generator: a torch.Generator on the evidence's device (None: the global one). Sampling is Gumbel-max.
        """
        alpha = self.forward_messages(evidence)
        log_A_t = self.log_A.to(evidence.dtype).t()
        uniform = torch.rand(evidence.shape, generator=generator, device=evidence.device, dtype=evidence.dtype)
        finfo = torch.finfo(evidence.dtype)
        gumbel = -torch.log(-torch.log(uniform.clamp(finfo.tiny, 1.0 - finfo.eps)))
        last = evidence.shape[1] - 1
        states = [torch.argmax(alpha[:, last] + gumbel[:, last], dim=-1)]
        for i in range(last - 1, -1, -1):
            # p(z_i | z_{i+1}, e_<=i) is proportional to alpha_i(z_i) * A[z_i, z_{i+1}].
            logits = alpha[:, i] + log_A_t[states[-1]]
            states.append(torch.argmax(logits + gumbel[:, i], dim=-1))
        return torch.stack(states[::-1], dim=1)

    @torch.no_grad()
    def couple(
        self, log_q: Tensor, evidence: Tensor, observed: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Sample a path z from `evidence` and return log_softmax(log_q + log E[z_i, .]) at masked positions.

        log_q: [B, W, V] the distribution to couple; evidence: [B, W, N]; observed: [B, W] bool, whose rows of log_q
        come back unchanged. Returns [B, W, V] in the compute dtype. Use with update_evidence to commit one token at
        a time without recomputing the soft evidence.
        """
        dtype = _compute_dtype(log_q)
        log_q = log_q.to(dtype)
        states = self.sample_states(evidence.to(dtype), generator)
        coupled = torch.log_softmax(log_q + self.log_E.to(dtype)[states], dim=-1)
        return torch.where(observed.unsqueeze(-1), log_q, coupled)

    @torch.no_grad()
    def coupled_log_probs(
        self,
        log_q: Tensor,
        tokens: Tensor,
        observed: Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        combine_with_sharpened: bool = True,
    ) -> Tensor:
        """CoDD's per-step operation: the denoiser's distribution coupled through one sampled HMM path, [B, W, V].

        log_q: [B, W, V] denoiser log-probs (or logits); tokens: [B, W] long; observed: [B, W] bool;
        temperature tau > 0. The path z is sampled from the posterior given the evidence of the sharpened
        q^(1/tau) (`sharpen`; observed positions hard). Masked positions return log_softmax(base + log E[z_i, .]);
        observed positions return log_q unchanged.

        base: by default the sharpened log_softmax(log_q / tau), as the reference does (liuanji/CoDD,
        `apply_pc_logits`: the sampled emissions are added to the tempered soft evidence, and the sampler then
        draws candidates and ranks confidences from that sum). combine_with_sharpened=False adds log E[z] to the
        denoiser's own q instead: the selector then sees unsharpened confidences (a threshold keeps its meaning at
        any tau) and a one-state, uniform-emission HMM returns exactly the factorised distribution.
        """
        sharpened = sharpen(log_q, temperature)
        evidence = self.emission_evidence(sharpened, tokens, observed, chunk_size)
        base = sharpened if combine_with_sharpened else log_q
        coupled = self.couple(base, evidence, observed, generator)
        return torch.where(observed.unsqueeze(-1), log_q.to(coupled.dtype), coupled)

    # ------------------------------------------------------------------------------------- exact marginals

    def token_log_marginals(
        self, evidence: Tensor, log_q: Tensor, tokens: Tensor, observed: Tensor, chunk_size: int | None = None
    ) -> Tensor:
        """Exact marginals log p^(x_i = v | x_t) of the product of experts from precomputed evidence: [B, W, V].

        evidence: [B, W, N] (from emission_evidence / update_evidence with the same log_q and observed set);
        log_q: [B, W, V]; tokens: [B, W] long; observed: [B, W] bool. Masked i:
        p(x_i = v) is proportional to q_i(v) * sum_z p(z_i = z, e_<i) E[z, v] p(e_>i | z_i = z), i.e. the evidence
        at i itself is excluded and replaced by the token. Observed i: a point mass on tokens_i (0 there, -inf
        elsewhere). chunk_size bounds the [N, chunk] temporaries over V.
        """
        dtype = evidence.dtype
        predicted, _ = self._forward(evidence)
        excluding_self = predicted + self.backward_messages(evidence)
        log_E = self.log_E.to(dtype)
        vocab = log_E.shape[-1]
        step = vocab if chunk_size is None else chunk_size
        hmm_term = torch.cat(
            [_log_matmul(excluding_self, log_E[:, start : start + step]) for start in range(0, vocab, step)], dim=-1
        )
        marginals = torch.log_softmax(log_q.to(dtype) + hmm_term, dim=-1)
        point_mass = torch.full_like(marginals, -math.inf).scatter_(
            -1, tokens.masked_fill(~observed, 0).unsqueeze(-1), 0.0
        )
        return torch.where(observed.unsqueeze(-1), point_mass, marginals)

    def posterior_token_log_marginals(
        self, log_q: Tensor, tokens: Tensor, observed: Tensor, chunk_size: int | None = None
    ) -> Tensor:
        """Exact per-position marginals of p^(x | x_t) by forward-backward: [B, W, V] (see token_log_marginals).

        log_q: [B, W, V]; tokens: [B, W] long; observed: [B, W] bool.
        """
        evidence = self.emission_evidence(log_q, tokens, observed, chunk_size)
        return self.token_log_marginals(evidence, log_q, tokens, observed, chunk_size)


# ----------------------------------------------------------------------------------------------- persistence


def save_prior(prior: HMMPrior, directory: str | Path, extra_config: dict | None = None) -> None:
    """Write `hmm_prior.safetensors` (the logits) and `codd_config.json` into `directory` (created if needed).

    The config holds n_states and vocab_size plus every key of extra_config (e.g. window, tokenizer_fingerprint);
    extra_config may not redefine n_states or vocab_size. Values must be JSON-serialisable.
    """
    config = {"n_states": prior.n_states, "vocab_size": prior.vocab_size}
    for key, value in (extra_config or {}).items():
        if key in config and config[key] != value:
            raise ValueError(f"extra_config[{key!r}] = {value!r} contradicts the prior's {config[key]!r}")
        config[key] = value
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in prior.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILENAME))
    (directory / CONFIG_FILENAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_prior(directory: str | Path, device: torch.device | str | None = None) -> tuple[HMMPrior, dict]:
    """Read a prior written by save_prior: returns (HMMPrior on `device`, default CPU, config dict).

    Raises UserError when the folder, the config or the weights are missing, unreadable or inconsistent.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILENAME, directory / WEIGHTS_FILENAME
    if not directory.is_dir():
        raise UserError(f"CoDD prior folder not found: {directory}")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"CoDD prior folder {directory} has no {path.name}")
    try:
        config = json.loads(config_path.read_text())
        n_states, vocab_size = int(config["n_states"]), int(config["vocab_size"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"corrupt CoDD config {config_path}: {error}") from None
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"corrupt CoDD weights {weights_path}: {error}") from None
    prior = HMMPrior(n_states, vocab_size)
    if "emit_logits" in tensors:
        prior = prior.to(tensors["emit_logits"].dtype)
    try:
        prior.load_state_dict(tensors)
    except RuntimeError as error:
        message = " ".join(str(error).split())
        raise UserError(f"CoDD weights {weights_path} do not match its config: {message}") from None
    return prior.to(device or "cpu"), config
