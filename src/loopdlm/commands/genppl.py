"""`loopdlm genppl`: generative perplexity of a checkpoint's samples under a judge (a `train-judge` run or a local
Hugging Face model), with sample entropy and distinct-n."""

from __future__ import annotations

import json

import torch

from loopdlm.commands.arguments import DEVICE_HELP, SEED_HELP, non_negative_int, positive_int
from loopdlm.commands.sample import add_sampler_arguments, checkpoint_decoder, sampler_spec_from_args
from loopdlm.eval.genppl import generative_perplexity, load_judge
from loopdlm.sampling import prompt_canvas
from loopdlm.workflow import load_pretrained, resolve_device


def register(subparsers) -> None:
    parser = subparsers.add_parser("genppl", help="generative perplexity of samples under a judge, with entropy")
    parser.add_argument("--checkpoint", required=True, help="the diffusion model to sample from")
    parser.add_argument("--judge", required=True, help="a train-judge run/checkpoint folder, or hf:LOCAL_PATH")
    parser.add_argument("--num-samples", type=positive_int, default=16, help="samples to score")
    parser.add_argument("--length", type=positive_int, default=None, help="tokens per sample (default: the training "
                        "context)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="samples generated together")
    parser.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--show", type=non_negative_int, default=0, help="print this many samples")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_sampler_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> None:
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
