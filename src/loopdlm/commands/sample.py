"""`loopdlm sample`: generate text from a checkpoint with any sampler and loop policy."""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import partial

import torch

from loopdlm.errors import UserError
from loopdlm.eval.denoising_viewer import block_trace_document, trace_document, write_trace_json, write_viewer
from loopdlm.sampling import SELECTORS, SamplerSpec, prompt_canvas, sample
from loopdlm.sampling.coupling import AnyOrderCoDDSelector, CoDDTransform, load_codd_layer
from loopdlm.sampling.long_generation import sample_blocks
from loopdlm.workflow import load_pretrained, resolve_device


def add_sampler_arguments(parser) -> None:
    """Flags that describe a sampler (shared by `sample`, task evaluation and judging); every flag left out falls
    back to the checkpoint config's `sample` section."""
    parser.add_argument("--sampler", default=None, help=f"one of {', '.join(sorted(SELECTORS))}")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps for the whole generated region")
    parser.add_argument("--block-length", type=int, default=None, help="semi-AR block length (0 = one block)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--threshold", type=float, default=None, help="confidence threshold (threshold)")
    parser.add_argument("--factor", type=float, default=None, help="Fast-dLLM factor f (factor)")
    parser.add_argument("--eb-gamma", type=float, default=None, help="entropy budget in nats (eb)")
    parser.add_argument("--tau1", type=float, default=None, help="WINO draft threshold (wino)")
    parser.add_argument("--tau2", type=float, default=None, help="WINO verify threshold (wino)")
    parser.add_argument("--loops", type=int, default=None, help="core applications S (default: training S_max)")
    parser.add_argument("--loop-policy", choices=["fixed", "scheduled", "adaptive"], default=None)
    parser.add_argument("--min-loops", type=int, default=None, help="scheduled policy: S at the ends")
    parser.add_argument("--loop-eps", type=float, default=None, help="adaptive policy: convergence threshold")
    parser.add_argument("--per-token-exit", action="store_true", default=None,
                        help="adaptive policy: freeze converged tokens")


def sampler_spec_from_args(args, config) -> SamplerSpec:
    """The checkpoint config's sampler with every flag the user gave put over it; validates S."""
    if getattr(args, "loops", None) is not None and args.loops < 1:
        raise UserError(f"--loops must be >= 1, got {args.loops}")
    values = {f.name: getattr(config.sample, f.name) for f in dataclasses.fields(SamplerSpec)}
    values.update({name: value for name, value in vars(args).items() if name in values and value is not None})
    return SamplerSpec(**values)


def _coupling(args, loaded, spec: SamplerSpec, device):
    """(transforms, selector wrapper) for --codd: the HMM prior coupling tokens committed in the same step."""
    if args.codd is None:
        return (), None
    prior, layer = load_codd_layer(args.codd, loaded.model.config.vocab_size, loaded.tokenizer.fingerprint(), device)
    options = dict(temperature=args.codd_tau, gamma=args.codd_gamma, window=layer["window"], seed=args.seed)
    if args.codd_any_order:
        return (), lambda inner: AnyOrderCoDDSelector(inner, prior, sampling_temperature=spec.temperature,
                                                      top_p=spec.top_p, **options)
    return (CoDDTransform(prior, **options),), None


def _sample_block_diffusion(loaded, rows: list[list[int]], spec: SamplerSpec, block_size: int, args, generator,
                            transforms, record_trace: bool):
    """Block-by-block generation with the KV cache, past the training context if asked, stopping rows at EOS."""
    config = loaded.config
    length = args.length or config.data.seq_len
    if any(len(row) >= config.data.seq_len for row in rows):
        raise UserError(f"prompt leaves no room within the context of {config.data.seq_len} tokens")
    return sample_blocks(loaded.model, rows, loaded.tokenizer.mask_id, loaded.tokenizer.eos_id, spec, length,
                         block_size, context_window=config.data.seq_len, generator=generator, transforms=transforms,
                         record_trace=record_trace)


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="generate from a checkpoint")
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--prompt", action="append", default=[], help="prefix text (repeat for several)")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per prompt")
    parser.add_argument("--length", type=int, default=None, help="tokens per row (default: training length); "
                        "block-diffusion models generate this many new tokens, also past the training context")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trace", default=None, help="write the step-by-step trace as JSON to this file (the "
                        "document the --html page embeds)")
    parser.add_argument("--html", default=None, help="write a self-contained HTML page replaying the decode step by "
                        "step to this file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--codd", default=None, help="CoDD layer folder (from `loopdlm train-codd`) to couple "
                        "tokens committed together")
    parser.add_argument("--codd-tau", type=float, default=0.1, help="CoDD: temperature on the denoiser's q")
    parser.add_argument("--codd-gamma", type=float, default=0.5, help="CoDD: couple only below this mask ratio")
    parser.add_argument("--codd-any-order", action="store_true",
                        help="CoDD: commit a step's tokens one at a time from the exact HMM conditional")
    add_sampler_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> None:
    device = resolve_device(args.device)
    loaded = load_pretrained(args.checkpoint, device)
    tok, config = loaded.tokenizer, loaded.config
    spec = sampler_spec_from_args(args, config)
    count = args.num_samples or config.sample.num_samples
    if count < 1:
        raise UserError(f"--num-samples must be >= 1, got {count}")
    prompts = [tok.encode(p) for p in (args.prompt or [""])]
    rows = [ids for ids in prompts for _ in range(count)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    transforms, wrap_selector = _coupling(args, loaded, spec, device)
    record_trace = bool(args.trace or args.html)
    block_size = config.diffusion.block_size
    meta = {"title": "loopdlm denoising viewer", "checkpoint": str(loaded.path),
            "prompts": [tok.decode(row) for row in rows], "sampler": vars(spec), "codd": args.codd}
    if block_size is not None and block_size < config.data.seq_len:
        if wrap_selector is not None:
            raise UserError("--codd-any-order is not available for block-diffusion generation; drop it")
        result = _sample_block_diffusion(loaded, rows, spec, block_size, args, generator, transforms, record_trace)
        texts = [tok.decode(prompt + generated) for prompt, generated in zip(rows, result.sequences)]
        meta["stop_reasons"] = result.stop_reasons
        make_document = partial(block_trace_document, result.traces, result.prompt_padding, tok)
    else:
        length = args.length or config.data.seq_len
        if length > config.data.seq_len:
            raise UserError(f"--length {length} exceeds the training context of {config.data.seq_len} tokens "
                            "(only block-diffusion models generate past it)")
        canvas = prompt_canvas(rows, length, tok.mask_id, tok.pad_id).to(device)
        result = sample(loaded.model, canvas, tok.mask_id, spec, generator, record_trace=record_trace,
                        transforms=transforms, wrap_selector=wrap_selector)
        texts = [tok.decode(row.tolist()) for row in result.tokens]
        # The prompts' left padding is never shown.
        make_document = partial(trace_document, result.trace, tok, canvas.cpu() == tok.pad_id)
    stats = result.stats.summary()
    if args.json:
        print(json.dumps({"samples": texts, "stats": stats, "sampler": vars(spec)}))
    else:
        print(f"# sampler={spec.sampler} steps={spec.steps} loops={spec.loops or loaded.model.config.max_loops} "
              f"policy={spec.loop_policy} | forward passes {stats['forward_passes']}, core applications/row "
              f"{stats['core_applications']:.1f}, {stats['tokens_per_s']:.0f} tokens/s")
        for index, text in enumerate(texts):
            print(f"--- sample {index}\n{text}")
    if record_trace:
        # Side files come after the samples, so a bad path loses nothing already printed.
        sys.stdout.flush()
        meta.update(samples=texts, stats=stats, sampler_summary=f"sampler {spec.sampler}, steps {spec.steps}, "
                    f"loops {spec.loops or loaded.model.config.max_loops} ({spec.loop_policy})"
                    + (f", CoDD {args.codd}" if args.codd else ""),
                    stats_summary=f"{stats['forward_passes']} forward passes, {stats['core_applications']:.1f} core "
                    f"applications per row, {stats['remasked']} re-masked")
        document = make_document(meta=meta)
        if args.trace:
            write_trace_json(args.trace, document)
        if args.html:
            write_viewer(args.html, document)
