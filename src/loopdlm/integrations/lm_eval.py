"""lm-evaluation-harness adapter: a loopdlm checkpoint as the lm-eval model `loopdlm`.

    loopdlm lm-eval --model loopdlm --model_args checkpoint=runs/x,loops=8,mc_samples=64 --tasks T

Importing this module registers the model with lm-eval (it needs `pip install loopdlm[eval]`); the rest of loopdlm
never imports lm_eval. lm-eval releases with entry-point plugins find `loopdlm` through the `lm_eval.models` entry
point in pyproject.toml, so plain `lm_eval --model loopdlm` works there; lm-eval 0.4.13 has no plugin mechanism,
hence `loopdlm lm-eval ...` (or `python -m loopdlm.integrations.lm_eval ...`), which registers the model and then
runs lm-eval's own command line with the same arguments.

model_args: checkpoint (required); loops (S, 0 = training S_max); likelihood = mc (Monte-Carlo ELBO with
mc_samples stratified draws) or chain_rule (deterministic); check_greedy (also run the chain rule in mc mode to
answer is_greedy); score_batch (rows per likelihood forward pass); seed; device; use_ema; max_new_tokens; and
every sampler setting by its flag name (`SamplerConfig.FLAGS`: sampler, steps, block_length, temperature, top_p,
threshold, factor, eb_gamma, tau1, tau2, loop_policy, min_loops, loop_eps, per_token_exit, codd, codd_tau, ...)
for generate_until. lm-eval's --batch_size is the number of prompts generated together.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from types import SimpleNamespace

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from loopdlm.commands.sample import checkpoint_decoder, sampler_spec_from_args
from loopdlm.errors import UserError
from loopdlm.eval.continuation import ContinuationScore, ContinuationScorer
from loopdlm.eval.generation import cut_at_stop_strings, generate_continuations
from loopdlm.sampling import SamplerConfig
from loopdlm.workflow import load_pretrained, resolve_device

logger = logging.getLogger(__name__)
LIKELIHOODS = ("mc", "chain_rule")
SAMPLER_FIELDS = {name: type(getattr(*SamplerConfig().field_owner(path))).__name__
                  for name, path in SamplerConfig.FLAGS.items()}
#: lm-eval's default when a task sets no max_gen_toks
DEFAULT_MAX_GEN_TOKS = 256


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise UserError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def _typed(name: str, value, kind: str):
    """Coerce a model_args value (lm-eval passes strings or guessed types) to the sampler setting's type."""
    try:
        return {"int": int, "float": float, "bool": _as_bool, "str": str}[kind](value)
    except (TypeError, ValueError):
        raise UserError(f"model_args {name}={value!r} is not a valid {kind}") from None


@register_model("loopdlm")
class LoopDLMEval(LM):
    """lm-eval `LM` over a loopdlm checkpoint: ELBO / chain-rule likelihoods and diffusion generation."""

    def __init__(self, checkpoint: str | None = None, loops: int = 0, likelihood: str = "mc", mc_samples: int = 64,
                 check_greedy: bool = False, score_batch: int = 64, seed: int = 0, device: str | None = None,
                 use_ema: bool = True, max_new_tokens: int = 0, batch_size: int | str = 1,
                 max_batch_size: int | None = None, **sampler_args):
        super().__init__()
        if not checkpoint:
            raise UserError("model_args needs checkpoint=RUN_OR_CHECKPOINT_FOLDER")
        if likelihood not in LIKELIHOODS:
            raise UserError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
        unknown = sorted(set(sampler_args) - set(SAMPLER_FIELDS))
        if unknown:
            raise UserError(f"unknown model_args {', '.join(unknown)}")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes its default cuda:0 on every machine; fall back as its own HF model does.
            logger.warning("loopdlm: CUDA is not available, evaluating on the CPU instead of %s", device)
            device = "cpu"
        self._device = resolve_device(device or "auto")
        self.loaded = load_pretrained(checkpoint, self._device, use_ema=_as_bool(use_ema))
        config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.context = config.data.seq_len
        block = config.diffusion.block_size
        self.block_size = block if block is not None and block < self.context else None
        given = {name: _typed(name, value, SAMPLER_FIELDS[name]) for name, value in sampler_args.items()}
        self.temperature_given = "temperature" in given
        self.spec = sampler_spec_from_args(SimpleNamespace(loops=int(loops) or None, **given), config)
        self.loops = checkpoint_decoder(self.loaded, self.spec).loops
        self.likelihood = likelihood
        self.mc_samples = int(mc_samples)
        self.check_greedy = _as_bool(check_greedy)
        self.max_new_tokens = int(max_new_tokens)
        self.generation_batch = 32 if str(batch_size).startswith("auto") else int(batch_size)
        if self.mc_samples < 1 or self.generation_batch < 1:
            raise UserError("mc_samples and batch_size must be >= 1")
        self.seed = int(seed)
        self.scorer = ContinuationScorer(self.loaded.model, self.tokenizer.mask_id, self.context, self.loops,
                                         self.block_size, int(score_batch))
        self.generation = {"forward_passes": 0, "core_applications": 0.0, "tokens": 0, "wall_time_s": 0.0}
        #: every ContinuationScore of the last loglikelihood / loglikelihood_rolling call (with its stderr)
        self.last_scores: list[ContinuationScore] = []
        self._stderrs: list[float] = []

    # ------------------------------------------------------------------------------------------- likelihood
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation); trailing context spaces move to the continuation (lm-eval's
        convention), and the continuation is what encoding the whole adds after the context."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        prompt = self.tokenizer.encode(context)
        return prompt, whole[len(prompt):]

    def _score(self, pairs) -> list[ContinuationScore]:
        generator = torch.Generator().manual_seed(self.seed)
        if self.likelihood == "chain_rule":
            scores = self.scorer.chain_rule(pairs)
        else:
            scores = self.scorer.elbo(pairs, self.mc_samples, generator)
            if self.check_greedy:
                for score, exact in zip(scores, self.scorer.chain_rule(pairs)):
                    score.greedy = exact.greedy
        self._record(scores)
        return scores

    def _record(self, scores: list[ContinuationScore]) -> None:
        self.last_scores = scores
        self._stderrs += [s.stderr for s in scores if not math.isnan(s.stderr)]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(ELBO or chain-rule log p(continuation | context), is_greedy) per request; the context is never masked."""
        pairs = [self._encode_pair(*request.args) for request in requests]
        return [(s.log_likelihood, bool(s.greedy)) for s in self._score(pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full NELBO-based log-likelihood of each text, in disjoint windows of the training context."""
        texts = [self.tokenizer.encode(request.args[0]) for request in requests]
        samples = None if self.likelihood == "chain_rule" else self.mc_samples
        scores = self.scorer.rolling(texts, samples, torch.Generator().manual_seed(self.seed))
        self._record(scores)
        return [s.log_likelihood for s in scores]

    # ------------------------------------------------------------------------------------------- generation
    def _request_spec(self, gen_kwargs: dict) -> SamplerConfig:
        """The sampler for one request: its temperature (do_sample=False -> 0) unless model_args fixed one."""
        if self.temperature_given:
            return self.spec
        if gen_kwargs.get("do_sample") is False:
            return dataclasses.replace(self.spec, temperature=0.0)
        if "temperature" in gen_kwargs:
            return dataclasses.replace(self.spec, temperature=float(gen_kwargs["temperature"]))
        return self.spec

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for every request, batched by identical settings, cut at its `until` strings."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            length = self.max_new_tokens or int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            spec = self._request_spec(gen_kwargs)
            settings.append((until, length, spec))
            groups.setdefault((until, length, tuple(spec.flags().items())), []).append(index)
        outputs = [""] * len(requests)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        for indices in groups.values():
            until, length, spec = settings[indices[0]]
            decoder = checkpoint_decoder(self.loaded, spec, self.seed)
            for start in range(0, len(indices), self.generation_batch):
                chunk = indices[start:start + self.generation_batch]
                prompts = [self.tokenizer.encode(requests[i].args[0]) for i in chunk]
                result = generate_continuations(decoder, self.tokenizer, prompts, length, until, generator)
                for i, ids in zip(chunk, result.sequences):
                    outputs[i] = cut_at_stop_strings(self.tokenizer.decode(ids), until)
                self._count_generation(result)
        return outputs

    def _count_generation(self, result) -> None:
        stats = result.stats
        self.generation["forward_passes"] += stats.forward_passes
        self.generation["core_applications"] += float(stats.core_applications.sum())
        self.generation["tokens"] += sum(len(s) for s in result.sequences)
        self.generation["wall_time_s"] += stats.wall_time

    # ------------------------------------------------------------------------------------------- reporting
    def get_model_info(self) -> dict:
        """Merged by lm-eval into results['config']: settings, likelihood and generation accounting."""
        generation = dict(self.generation)
        wall = generation["wall_time_s"]
        generation["tokens_per_s"] = generation["tokens"] / wall if wall > 0 else 0.0
        stderr = {"mean": sum(self._stderrs) / len(self._stderrs), "max": max(self._stderrs)} if self._stderrs else {}
        return {"loopdlm": {
            "checkpoint": str(self.loaded.path), "loops": self.loops, "likelihood": self.likelihood,
            "mc_samples": self.mc_samples, "block_size": self.block_size, "sampler": self.spec.flags(),
            "likelihood_stats": self.scorer.stats.as_dict(), "loglikelihood_stderr": stderr,
            "generation_stats": generation,
        }}

    @property
    def tokenizer_name(self) -> str:
        return f"loopdlm-{self.tokenizer.kind}-{self.tokenizer.fingerprint()[:12]}"


def run_harness(argv: list[str]) -> None:
    """lm-eval's command line on `argv`, with `loopdlm` registered (UserError propagates)."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    """`python -m loopdlm.integrations.lm_eval ARGS`: user errors print one line and return 2."""
    try:
        run_harness(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"loopdlm lm-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
