"""Generative perplexity: score generated text with a separate autoregressive judge, always beside the sample's
entropy and distinct-n (a degenerate, repetitive sample gets a low gen-PPL, so gen-PPL alone says little).

Judges: an in-repo `LoopedTransformer` trained with `loopdlm train-judge` (scored with a causal mask), or, as an
optional extra, a Hugging Face causal LM from a local folder ("hf:PATH", needs `transformers`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from loopdlm.data.tokenizers import Tokenizer
from loopdlm.errors import UserError
from loopdlm.models.transformer import LoopedTransformer
from loopdlm.models.layers import causal_mask
from loopdlm.train.autoregressive import next_token_nll
from loopdlm.workflow import load_pretrained

HF_PREFIX = "hf:"


class Judge(Protocol):
    """An autoregressive scorer of text."""

    name: str

    def score(self, texts: Sequence[str]) -> tuple[float, int]:
        """(summed next-token NLL in nats, number of predicted tokens) over `texts`, each scored independently."""


class LoopedJudge:
    """A causal `LoopedTransformer` (trained by `train-judge`) with its tokenizer.

    Texts are tokenised with the judge's tokenizer and cut into non-overlapping windows of at most
    `context_length` tokens (the length the judge was trained on); in each window every token but the first is
    predicted from the ones before it.
    """

    def __init__(self, model: LoopedTransformer, tokenizer: Tokenizer, context_length: int, batch_size: int = 16,
                 name: str = "judge"):
        if context_length < 2:
            raise UserError(f"judge context length must be >= 2, got {context_length}")
        self.model, self.tokenizer = model, tokenizer
        self.context_length, self.batch_size, self.name = context_length, batch_size, name

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> tuple[float, int]:
        windows = [ids[i:i + self.context_length]
                   for ids in (self.tokenizer.encode(text) for text in texts)
                   for i in range(0, len(ids), self.context_length)]
        windows = [w for w in windows if len(w) >= 2]
        device = next(self.model.parameters()).device
        total, count = 0.0, 0
        for length in sorted({len(w) for w in windows}):
            same = [w for w in windows if len(w) == length]
            mask = causal_mask(length, device)
            for start in range(0, len(same), self.batch_size):
                tokens = torch.tensor(same[start:start + self.batch_size], dtype=torch.long, device=device)
                nll = next_token_nll(self.model(tokens, attn_mask=mask).logits, tokens)
                total += float(nll.sum())
                count += nll.numel()
        return total, count


class HFJudge:
    """A Hugging Face causal LM loaded from a local folder (no download). Requires `transformers`."""

    def __init__(self, path: str, device: torch.device | str, batch_size: int = 8):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise UserError("a Hugging Face judge needs the optional dependency: pip install transformers") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        except OSError as err:
            raise UserError(f"cannot load a Hugging Face causal LM from {path}: {' '.join(str(err).split())}") \
                from None
        self.device, self.batch_size, self.name = torch.device(device), batch_size, f"{HF_PREFIX}{path}"
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 1024))

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> tuple[float, int]:
        total, count = 0.0, 0
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids), self.context_length):
                window = ids[i:i + self.context_length]
                if len(window) < 2:
                    continue
                tokens = torch.tensor([window], device=self.device)
                nll = next_token_nll(self.model(tokens).logits, tokens)
                total += float(nll.sum())
                count += nll.numel()
        return total, count


def load_judge(spec: str, device: torch.device | str, batch_size: int = 16) -> Judge:
    """'hf:PATH' -> `HFJudge`; anything else is a `train-judge` run or checkpoint folder -> `LoopedJudge`."""
    if spec.startswith(HF_PREFIX):
        return HFJudge(spec[len(HF_PREFIX):], device, batch_size)
    loaded = load_pretrained(spec, device)
    return LoopedJudge(loaded.model, loaded.tokenizer, loaded.config.data.seq_len, batch_size, name=str(loaded.path))


def unigram_entropy(tokens: Sequence[int]) -> float:
    """Entropy in nats of the empirical token distribution of one sample: -sum_v p_v log p_v, p_v = count / len."""
    if not tokens:
        return 0.0
    counts = Counter(tokens)
    size = len(tokens)
    return -sum(c / size * math.log(c / size) for c in counts.values())


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of all samples pooled (n-grams do not cross sample boundaries), in [0, 1];
    0 when no sample is n tokens long."""
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class GenPPLReport:
    """gen_ppl = exp(nll_per_token) under the judge (token-weighted over all samples); entropy: mean over samples
    of `unigram_entropy` of the generator's token ids (nats); distinct: {n: distinct_n} for n = 1..4."""

    judge: str
    num_samples: int
    judge_tokens: int
    nll_per_token: float
    entropy: float
    distinct: dict[int, float] = field(default_factory=dict)

    @property
    def gen_ppl(self) -> float:
        """exp(judge NLL per token)."""
        return math.exp(min(self.nll_per_token, 700.0))

    def as_dict(self) -> dict[str, object]:
        """Plain values for JSON."""
        return {"judge": self.judge, "num_samples": self.num_samples, "judge_tokens": self.judge_tokens,
                "nll_per_token": self.nll_per_token, "gen_ppl": self.gen_ppl, "entropy": self.entropy,
                **{f"distinct_{n}": v for n, v in self.distinct.items()}}


def generative_perplexity(judge: Judge, texts: Sequence[str], token_rows: Sequence[Sequence[int]]) -> GenPPLReport:
    """Score decoded samples `texts` with `judge`; entropy and distinct-n come from the generator's ids
    `token_rows` (one list of ints per sample, same order). UserError when the judge has nothing to score."""
    if len(texts) != len(token_rows) or not texts:
        raise UserError("need one token row per text and at least one sample")
    total, count = judge.score(texts)
    if count == 0:
        raise UserError("the samples are too short for the judge to score (fewer than 2 tokens each)")
    return GenPPLReport(judge=judge.name, num_samples=len(texts), judge_tokens=count, nll_per_token=total / count,
                        entropy=sum(unigram_entropy(list(r)) for r in token_rows) / len(token_rows),
                        distinct={n: distinct_n(token_rows, n) for n in range(1, 5)})
