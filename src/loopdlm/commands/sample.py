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
    non_negative_int,
    positive_int,
    spec_type,
)
from loopdlm.errors import UserError
from loopdlm.eval.denoising_viewer import continuation_document, write_json, write_viewer
from loopdlm.sampling import SELECTORS, Decoder, SamplerConfig, build_decoder
from loopdlm.sampling.long_generation import EosStop
from loopdlm.sampling.sampler_config import LOOP_POLICIES
from loopdlm.settings import field_help
from loopdlm.workflow import LoadedModel, load_pretrained, resolve_device


def add_sampler_arguments(parser) -> None:
    """Flags that describe a sampler (shared by `sample`, task evaluation and judging); every flag left out falls
    back to the checkpoint config's `sample` section. Each flag sets the field `SamplerConfig.FLAGS` names, and its
    help text and allowed range come from that field."""

    def flag(name: str, kind: type | None = None, help_text: str | None = None, **options) -> None:
        owner, field = SamplerConfig().field_owner(SamplerConfig.FLAGS[name])
        if kind is not None:
            options["type"] = spec_type(type(owner), field, kind)
        path = SamplerConfig.FLAGS[name]
        parser.add_argument("--" + name.replace("_", "-"), default=None, **options,
                            help=f"{help_text or field_help(type(owner), field)} (default: the checkpoint's "
                            f"sample.{path})")

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
    flag("loops", help_text="core applications S per forward pass (0 in the config = training S_max)",
         type=positive_int)
    flag("loop_policy", choices=list(LOOP_POLICIES))
    flag("min_loops", int)
    flag("loop_eps", float)
    flag("per_token_exit", action="store_true")
    flag("codd", help_text="CoDD layer folder (from `loopdlm train-codd`) to couple tokens committed together")
    flag("codd_tau", float)
    flag("codd_gamma", float)
    flag("codd_any_order", action="store_true")


def sampler_spec_from_args(args, config) -> SamplerConfig:
    """The checkpoint config's sampler with every flag the user gave put over it; ConfigError (one line) when a
    value, e.g. one saved in an old checkpoint, is out of range."""
    saved = SamplerConfig(**{f.name: getattr(config.sample, f.name) for f in dataclasses.fields(SamplerConfig)})
    given = {name: value for name, value in vars(args).items() if name in SamplerConfig.FLAGS and value is not None}
    sampler = saved.with_flags(**given)
    sampler.validate("sample.")
    return sampler


def checkpoint_decoder(loaded: LoadedModel, sampler: SamplerConfig, seed: int = 0) -> Decoder:
    """`build_decoder` for a loaded checkpoint: its model, noise process, tokenizer and training context."""
    tokenizer = loaded.tokenizer
    return build_decoder(loaded.model, loaded.config.diffusion, sampler, tokenizer.mask_id,
                         context=loaded.config.data.seq_len, tokenizer_fingerprint=tokenizer.fingerprint(), seed=seed)


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
    decoder = checkpoint_decoder(loaded, spec, args.seed)
    count = args.num_samples if args.num_samples is not None else config.sample.num_samples
    prompts = [tok.encode(p) for p in (args.prompt or [""])]
    rows = [ids for ids in prompts for _ in range(count)]
    longest = max(len(p) for p in prompts)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    record_trace = bool(args.trace or args.html)
    codd = spec.codd.prior or None
    meta = {"title": "loopdlm denoising viewer", "checkpoint": str(loaded.path),
            "prompts": [tok.decode(row) for row in rows], "sampler": spec.flags(), "codd": codd}
    length = args.length if args.length is not None else config.sample.length
    new_tokens = new_token_count(length, longest, config.data.seq_len, past_context=decoder.past_context)
    stop = (EosStop(tok.eos_id),) if tok.eos_id is not None else ()
    result = decoder.continue_prompts(rows, new_tokens, tok.pad_id, stop, generator, record_trace)
    texts = [tok.decode(prompt + generated) for prompt, generated in zip(rows, result.sequences)]
    if decoder.past_context:
        meta["stop_reasons"] = result.stop_reasons
    make_document = partial(continuation_document, result, tok)
    stats = result.stats.summary()
    loops = decoder.loops
    record = {"prompts": meta["prompts"], "samples": texts, "stats": stats,
              "sampler": {**spec.flags(), "loops": loops}, "new_tokens": new_tokens}
    if args.json:
        print(json.dumps(record))
    else:
        loops_per_pass = stats["core_applications"] / max(stats["row_forward_passes"], 1)
        print(f"# sampler={spec.sampler} loops={loops} policy={spec.loop.policy} | {new_tokens} new tokens per "
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


def _write_side_files(args, record: dict, meta: dict, make_document, stats: dict, spec: SamplerConfig,
                      loops: int) -> None:
    """--out (the printed record), --trace (the decode as JSON) and --html (the page replaying it)."""
    if args.out:
        write_json(args.out, record)
    if make_document is not None:
        meta.update(samples=record["samples"], stats=stats, sampler_summary=f"sampler {spec.sampler}, steps "
                    f"{stats['steps']}, loops {loops} ({spec.loop.policy})"
                    + (f", CoDD {meta['codd']}" if meta["codd"] else ""),
                    stats_summary=f"{stats['forward_passes']} forward passes, {stats['core_applications']:.1f} core "
                    f"applications per row, {stats['remasked']} re-masked")
        document = make_document(meta=meta)
        if args.trace:
            write_json(args.trace, document)
        if args.html:
            write_viewer(args.html, document)
