"""`loopdlm export CHECKPOINT --hf DIR`: a Hugging Face model folder (config, modeling file, weights, tokenizer)."""

from __future__ import annotations

from loopdlm.export.hf import export_hf
from loopdlm.workflow import load_pretrained


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a checkpoint as a Hugging Face model folder")
    parser.add_argument("checkpoint", help="run folder or checkpoint folder")
    parser.add_argument("--hf", required=True, metavar="DIR", help="folder to write (created if missing)")
    parser.add_argument("--no-ema", action="store_true", help="export the live weights instead of the EMA ones")
    parser.set_defaults(func=run)


def run(args) -> None:
    loaded = load_pretrained(args.checkpoint, "cpu", use_ema=not args.no_ema)
    directory = export_hf(loaded, args.hf)
    print(f"wrote {directory} (load with AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=True))")
