"""Task accuracy: fill the answer region of held-out prompts with any sampler and loop count, then verify.

Accuracy is exact task correctness as judged by `Task.verify` (a valid sudoku that keeps the givens, the recomputed
sum, the GSM8K reference number), not string match against one gold answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loopdlm.data.task_source import answer_canvas, encode_task
from loopdlm.data.tasks import Example, Task, TokenizerLike, decode_answers
from loopdlm.errors import UserError
from loopdlm.sampling import Decoder


@dataclass
class TaskAccuracy:
    """Result of one evaluation.

    loops: the S the sampler was asked for (0 = the model's training S_max); correct / n: verified answers;
    forward_passes: batched model calls summed over batches; core_applications: mean loop evaluations per example
    over its whole decode; wall_time: seconds; predictions: the decoded answers, in example order.
    """

    task: str
    loops: int
    n: int
    correct: int
    forward_passes: int
    core_applications: float
    wall_time: float
    predictions: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """correct / n."""
        return self.correct / self.n

    @property
    def stderr(self) -> float:
        """Binomial standard error of the accuracy, sqrt(p (1 - p) / n)."""
        p = self.accuracy
        return math.sqrt(p * (1 - p) / self.n)

    def as_dict(self) -> dict[str, float | int | str]:
        """Scalars only (no predictions), for JSON output."""
        return {"task": self.task, "loops": self.loops, "n": self.n, "correct": self.correct,
                "accuracy": self.accuracy, "stderr": self.stderr, "forward_passes": self.forward_passes,
                "core_applications": self.core_applications, "wall_time_s": self.wall_time}


@torch.no_grad()
def task_accuracy(decoder: Decoder, tokenizer: TokenizerLike, task: Task, examples: list[Example],
                  batch_size: int = 64, seed: int = 0) -> TaskAccuracy:
    """Solve `examples` with `decoder` (its model under its sampler, `Decoder.fill`) and verify each answer.

    Each row is `[left-padded prompt | A masks]` (the layout `finetune` trains on); the sampler fills the masks,
    the answer is read up to the first eos. Runs on the model's device; the sampler's generator is seeded from
    `seed`, so a call is reproducible.

    Args:
        tokenizer: must provide encode/decode, mask_id, pad_id and eos_id (the checkpoint's tokenizer).
    """
    if not examples:
        raise UserError("no examples to evaluate")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    model, device = decoder.model, decoder.device
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    predictions: list[str] = []
    correct = forward_passes = 0
    core_total = wall = 0.0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            rows = encode_task(task, chunk, tokenizer)
            result = decoder.fill(answer_canvas(rows, tokenizer.mask_id).to(device), generator)
            answers = decode_answers(result.tokens.cpu(), tokenizer, rows.prompt_len)
            predictions += answers
            correct += sum(task.verify(e.prompt, a) for e, a in zip(chunk, answers))
            forward_passes += result.stats.forward_passes
            core_total += float(result.stats.core_applications.sum())
            wall += result.stats.wall_time
    finally:
        model.train(was_training)
    return TaskAccuracy(task=task.name, loops=decoder.sampler.loop.count, n=len(examples), correct=correct,
                        forward_passes=forward_passes, core_applications=core_total / len(examples),
                        wall_time=wall, predictions=predictions)
