"""`loopdlm sample`: generate text from a checkpoint with any sampler and loop policy."""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import partial

import torch

from loopdlm.commands.arguments import (
    DEVICE_HELP,
    SEED_HELP,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    spec_type,
)
from loopdlm.errors import UserError
from loopdlm.eval.denoising_viewer import block_trace_document, trace_document, write_json, write_viewer
from loopdlm.sampling import SELECTORS, SamplerSpec, prompt_canvas, sample
from loopdlm.sampling.coupling import AnyOrderCoDDSelector, CoDDTransform, load_codd_layer
from loopdlm.sampling.long_generation import sample_blocks
from loopdlm.settings import field_help
from loopdlm.workflow import load_pretrained, resolve_device


def add_sampler_arguments(parser) -> None:
    """Flags that describe a sampler (shared by `sample`, task evaluation and judging); every flag left out falls
    back to the checkpoint config's `sample` section. Help texts and allowed ranges come from `SamplerSpec`."""

    def flag(name: str, kind: type | None = None, **options) -> None:
        if kind is not None:
            options["type"] = spec_type(SamplerSpec, name, kind)
        parser.add_argument("--" + name.replace("_", "-"), default=None, **options,
                            help=f"{field_help(SamplerSpec, name)} (default: the checkpoint's sample.{name})")

    flag("sampler", choices=sorted(SELECTORS))
    flag("steps", int)
    flag("block_length", int)
    flag("temperature", float)
    flag("top_p", float)
    flag("threshold", float)
    flag("factor", float)
    flag("eb_gamma", float)
    flag("tau1", float)
    flag("tau2", float)
    parser.add_argument("--loops", type=positive_int, default=None,
                        help="core applications S per forward pass (default: the checkpoint's sample.loops, "
                        "0 there = training S_max)")
    flag("loop_policy", choices=["fixed", "scheduled", "adaptive"])
    flag("min_loops", int)
    flag("loop_eps", float)
    flag("per_token_exit", action="store_true")


def sampler_spec_from_args(args, config) -> SamplerSpec:
    """The checkpoint config's sampler with every flag the user gave put over it; ConfigError (one line) when a
    value, e.g. one saved in an old checkpoint, is out of range."""
    values = {f.name: getattr(config.sample, f.name) for f in dataclasses.fields(SamplerSpec)}
    values.update({name: value for name, value in vars(args).items() if name in values and value is not None})
    spec = SamplerSpec(**values)
    spec.validate("sample.")
    return spec


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


def _sample_block_diffusion(loaded, rows: list[list[int]], spec: SamplerSpec, block_size: int, new_tokens: int,
                            args, generator, transforms, record_trace: bool):
    """Block-by-block generation with the KV cache, past the training context if asked, stopping rows at EOS."""
    config = loaded.config
    return sample_blocks(loaded.model, rows, loaded.tokenizer.mask_id, loaded.tokenizer.eos_id, spec, new_tokens,
                         block_size, context_window=config.data.seq_len, generator=generator, transforms=transforms,
                         record_trace=record_trace)


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="generate from a checkpoint")
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--prompt", action="append", default=[], help="prefix text (repeat for several)")
    parser.add_argument("--num-samples", type=positive_int, default=None,
                        help="samples per prompt (default: the checkpoint's sample.num_samples)")
    parser.add_argument("--length", type=non_negative_int, default=None,
                        help="new tokens to generate after the prompt, for every kind of model (default: the "
                        "checkpoint's sample.length; 0 = fill the training context after the prompt). Plain models "
                        "need prompt + length <= the training context; block-diffusion models go past it")
    parser.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--trace", default=None, help="write the step-by-step trace as JSON to this file (the "
                        "document the --html page embeds; written after the samples are printed)")
    parser.add_argument("--html", default=None, help="write a self-contained HTML page replaying the decode step by "
                        "step to this file")
    parser.add_argument("--out", default=None, help="write the prompts, samples, sampler and statistics as JSON to "
                        "this file (after the samples are printed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--codd", default=None, help="CoDD layer folder (from `loopdlm train-codd`) to couple "
                        "tokens committed together")
    parser.add_argument("--codd-tau", type=positive_float, default=0.1, help="CoDD: temperature on the denoiser's q")
    parser.add_argument("--codd-gamma", type=non_negative_float, default=0.5,
                        help="CoDD: couple only below this mask ratio")
    parser.add_argument("--codd-any-order", action="store_true",
                        help="CoDD: commit a step's tokens one at a time from the exact HMM conditional")
    add_sampler_arguments(parser)
    parser.set_defaults(func=run)


def new_token_count(requested: int, longest_prompt: int, context: int, past_context: bool) -> int:
    """Tokens to generate after the prompts: `requested`, or (0) what fills the context after the longest prompt.

    UserError when nothing fits, or when a model that cannot generate past its context (`past_context` False)
    is asked for more than fits."""
    room = context - longest_prompt
    if room < 1:
        raise UserError(f"prompt of {longest_prompt} tokens leaves no room within the training context of "
                        f"{context} tokens")
    if requested > room and not past_context:
        raise UserError(f"--length {requested} new tokens after a prompt of {longest_prompt} exceed the training "
                        f"context of {context} tokens (at most {room}; only block-diffusion models generate past it)")
    return requested or room


def run(args) -> None:
    device = resolve_device(args.device)
    loaded = load_pretrained(args.checkpoint, device, denoiser=True)
    tok, config = loaded.tokenizer, loaded.config
    spec = sampler_spec_from_args(args, config)
    count = args.num_samples if args.num_samples is not None else config.sample.num_samples
    prompts = [tok.encode(p) for p in (args.prompt or [""])]
    rows = [ids for ids in prompts for _ in range(count)]
    longest = max(len(p) for p in prompts)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    transforms, wrap_selector = _coupling(args, loaded, spec, device)
    record_trace = bool(args.trace or args.html)
    block_size = config.diffusion.block_size
    meta = {"title": "loopdlm denoising viewer", "checkpoint": str(loaded.path),
            "prompts": [tok.decode(row) for row in rows], "sampler": vars(spec), "codd": args.codd}
    block_diffusion = block_size is not None and block_size < config.data.seq_len
    length = args.length if args.length is not None else config.sample.length
    new_tokens = new_token_count(length, longest, config.data.seq_len, past_context=block_diffusion)
    if block_diffusion:
        if wrap_selector is not None:
            raise UserError("--codd-any-order is not available for block-diffusion generation; drop it")
        result = _sample_block_diffusion(loaded, rows, spec, block_size, new_tokens, args, generator, transforms,
                                         record_trace)
        texts = [tok.decode(prompt + generated) for prompt, generated in zip(rows, result.sequences)]
        meta["stop_reasons"] = result.stop_reasons
        make_document = partial(block_trace_document, result.traces, result.prompt_padding, tok)
    else:
        canvas = prompt_canvas(rows, longest + new_tokens, tok.mask_id, tok.pad_id).to(device)
        result = sample(loaded.model, canvas, tok.mask_id, spec, generator, record_trace=record_trace,
                        transforms=transforms, wrap_selector=wrap_selector)
        texts = [tok.decode(row.tolist()) for row in result.tokens]
        # The prompts' left padding is never shown.
        make_document = partial(trace_document, result.trace, tok, canvas.cpu() == tok.pad_id)
    stats = result.stats.summary()
    loops = spec.loops or loaded.model.config.max_loops
    record = {"prompts": meta["prompts"], "samples": texts, "stats": stats, "sampler": {**vars(spec), "loops": loops},
              "new_tokens": new_tokens}
    if args.json:
        print(json.dumps(record))
    else:
        loops_per_pass = stats["core_applications"] / max(stats["row_forward_passes"], 1)
        print(f"# sampler={spec.sampler} loops={loops} policy={spec.loop_policy} | {new_tokens} new tokens per "
              f"sample in {stats['steps']} denoising steps, {stats['forward_passes']} forward passes, "
              f"{loops_per_pass:.2f} core applications per pass, {stats['tokens_per_s']:.0f} tokens/s")
        for index, text in enumerate(texts):
            print(f"--- sample {index}\n{text}")
    # Side files come after the samples, so a bad path loses nothing already printed.
    sys.stdout.flush()
    try:
        _write_side_files(args, record, meta, make_document if record_trace else None, stats, spec, loops)
    except UserError as err:
        raise UserError(f"{err}; the samples above are complete") from None


def _write_side_files(args, record: dict, meta: dict, make_document, stats: dict, spec: SamplerSpec,
                      loops: int) -> None:
    """--out (the printed record), --trace (the decode as JSON) and --html (the page replaying it)."""
    if args.out:
        write_json(args.out, record)
    if make_document is not None:
        meta.update(samples=record["samples"], stats=stats, sampler_summary=f"sampler {spec.sampler}, steps "
                    f"{stats['steps']}, loops {loops} ({spec.loop_policy})" + (f", CoDD {args.codd}" if args.codd else ""),
                    stats_summary=f"{stats['forward_passes']} forward passes, {stats['core_applications']:.1f} core "
                    f"applications per row, {stats['remasked']} re-masked")
        document = make_document(meta=meta)
        if args.trace:
            write_json(args.trace, document)
        if args.html:
            write_viewer(args.html, document)
