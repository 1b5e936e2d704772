"""`loopdlm train-judge` (an autoregressive judge on a corpus) and `loopdlm genppl` (generative perplexity of a
checkpoint's samples under a judge, with sample entropy and distinct-n)."""

from __future__ import annotations

import json

import torch

from loopdlm.commands.arguments import DEVICE_HELP, SEED_HELP, non_negative_int, positive_int
from loopdlm.commands.sample import add_sampler_arguments, checkpoint_decoder, sampler_spec_from_args
from loopdlm.config import available_presets, load_config
from loopdlm.errors import UserError
from loopdlm.eval.genppl import generative_perplexity, load_judge
from loopdlm.sampling import prompt_canvas
from loopdlm.workflow import build_run, load_pretrained, resolve_device


def register(subparsers) -> None:
    judge = subparsers.add_parser("train-judge", help="train an autoregressive judge (causal mask, next-token loss)")
    judge.add_argument("--config", required=True, help=f"preset ({', '.join(available_presets())}) or YAML file")
    judge.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=500")
    judge.set_defaults(func=run_train_judge)

    genppl = subparsers.add_parser("genppl", help="generative perplexity of samples under a judge, with entropy")
    genppl.add_argument("--checkpoint", required=True, help="the diffusion model to sample from")
    genppl.add_argument("--judge", required=True, help="a train-judge run/checkpoint folder, or hf:LOCAL_PATH")
    genppl.add_argument("--num-samples", type=positive_int, default=16, help="samples to score")
    genppl.add_argument("--length", type=positive_int, default=None, help="tokens per sample (default: the training "
                        "context)")
    genppl.add_argument("--batch-size", type=positive_int, default=8, help="samples generated together")
    genppl.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    genppl.add_argument("--device", default="auto", help=DEVICE_HELP)
    genppl.add_argument("--show", type=non_negative_int, default=0, help="print this many samples")
    genppl.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_sampler_arguments(genppl)
    genppl.set_defaults(func=run_genppl)


def run_train_judge(args) -> None:
    config = load_config(args.config, args.overrides)
    if config.model.core_layers:
        raise UserError("a judge has no looped core: set model.core_start = model.core_end")
    if config.data.task:
        raise UserError("a judge trains on a corpus (data.source), not on a task")
    config.model.causal = True  # saved with the checkpoint, so every later load builds a causal model
    training = build_run(config)  # a causal model trains on the next-token NLL
    result = training.trainer.fit()
    if training.dist.is_main:
        print(f"trained judge {result.step} steps -> {result.checkpoint}")
        for values in result.eval_metrics.values():
            print(f"  val NLL {values['nats_per_token']:.4f} nats/token (ppl {values['ppl_bound']:.2f})")


def run_genppl(args) -> None:
    device = resolve_device(args.device)
    loaded = load_pretrained(args.checkpoint, device)
    tok, config = loaded.tokenizer, loaded.config
    spec = sampler_spec_from_args(args, config)
    decoder = checkpoint_decoder(loaded, spec, args.seed)
    length = args.length or config.data.seq_len
    judge = load_judge(args.judge, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    rows: list[list[int]] = []
    forward_passes, core = 0, 0.0
    for start in range(0, args.num_samples, args.batch_size):
        count = min(args.batch_size, args.num_samples - start)
        canvas = prompt_canvas([[] for _ in range(count)], length, tok.mask_id, tok.pad_id).to(device)
        result = decoder.fill(canvas, generator)
        rows += result.tokens.tolist()
        forward_passes += result.stats.forward_passes
        core += float(result.stats.core_applications.sum())
    texts = [tok.decode(r) for r in rows]
    report = generative_perplexity(judge, texts, rows)
    loops = decoder.loops
    settings = {"sampler": spec.sampler, "steps": spec.steps, "loops": loops, "top_p": spec.top_p,
                "temperature": spec.temperature, "precision": "float64 Gumbel", "length": length}
    if args.json:
        print(json.dumps({**report.as_dict(), **settings, "forward_passes": forward_passes,
                          "core_applications_per_sample": core / len(rows)}))
        return
    print(f"# {loaded.path} | " + " ".join(f"{k}={v}" for k, v in settings.items()))
    print(f"gen-PPL {report.gen_ppl:.3f} (judge {report.judge}, {report.judge_tokens} tokens) | entropy "
          f"{report.entropy:.3f} nats | distinct-1..4 " + " ".join(f"{v:.3f}" for v in report.distinct.values()))
    for text in texts[:args.show]:
        print(f"--- {text}")
