"""Render the denoising viewer in a real browser: train a tiny model, write a `sample --html` page, screenshot it
with headless Chromium into docs/img/denoising_viewer.png.

    python bench/render_viewer.py [--train-steps 60] [--sampler wino] [--step N] [--keep DIR]

Needs Debian's `chromium` package (`apt-get install -y chromium`); the test suite does not. The model is the
tiny-cpu LoopMDM (4 layers, core = layers 1-2 looped) trained for --train-steps steps in a temporary folder (or
--keep DIR) on a small synthetic corpus of templated sentences, which so short a training already predicts with
confidence, so WINO drafts several tokens a step and re-masks some (`--corpus shakespeare` uses the plays instead;
its samples stay rough this early). The page opens at step --step (default: half way through the decode, where
masks, fresh commits and re-masks are all visible).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loopdlm.cli import main  # noqa: E402
from loopdlm.eval.denoising_viewer import embedded_document  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--sampler", default="wino")
    parser.add_argument("--decode-steps", type=int, default=48)
    parser.add_argument("--loops", type=int, default=4)
    parser.add_argument("--tau1", type=float, default=0.3, help="WINO draft threshold (low: wide drafts)")
    parser.add_argument("--tau2", type=float, default=0.7, help="WINO verify threshold (high: more re-masks)")
    parser.add_argument("--step", type=int, default=None, help="step the screenshot shows (default: half way)")
    parser.add_argument("--corpus", choices=["synthetic", "shakespeare"], default="synthetic")
    parser.add_argument("--cache-dir", default="data_cache", help="data cache holding (or receiving) Shakespeare")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "denoising_viewer.png"))
    parser.add_argument("--window-size", default="1280,430")
    parser.add_argument("--keep", default=None, help="train and write the page here instead of a temporary folder")
    parser.add_argument("--chromium", default="chromium")
    return parser.parse_args()


def synthetic_corpus(path: Path) -> str:
    """Write the templated sentences; returns the data source spec."""
    names = ["ROMEO", "JULIET", "MERCUTIO", "TYBALT", "NURSE", "FRIAR"]
    things = ["the moon", "the night", "a rose", "the sword", "the letter", "the garden"]
    verbs = ["loves", "fears", "keeps", "seeks", "takes", "leaves"]
    lines = [f"{speaker}: {other.lower()} {verb} {thing}."
             for speaker, other, verb, thing in itertools.product(names, names, verbs, things)]
    random.Random(0).shuffle(lines)
    path.write_text("\n".join(lines * 2) + "\n", encoding="utf-8")
    return f"text:{path}"


def run_cli(argv: list[str]) -> None:
    code = main(argv)
    if code != 0:
        raise SystemExit(f"loopdlm {argv[0]} failed with exit code {code}")


def screenshot(chromium: str, page: Path, step: int, out: Path, window_size: str, profile: Path) -> None:
    """Headless Chromium with nothing that reaches the network, one screenshot of `page` opened at `step`."""
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={window_size}",
               f"{page.resolve().as_uri()}?step={step}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not out.is_file():
        raise SystemExit(f"chromium failed ({result.returncode}): {result.stderr.strip()[-500:]}")


def main_script() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if shutil.which(args.chromium) is None:
        raise SystemExit(f"{args.chromium} not found; install Debian's package: apt-get install -y chromium")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="loopdlm-viewer-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    source = synthetic_corpus(work / "corpus.txt") if args.corpus == "synthetic" else "shakespeare"
    # A higher learning rate and a short EMA than the preset's: the model has only a few hundred steps.
    run_cli(["train", "--config", "tiny-cpu", f"train.steps={args.train_steps}", "train.eval_every=0",
             f"data.source={source}", "train.lr=0.003", "train.warmup_steps=20", "train.ema_decay=0.9",
             "train.batch_size=32", f"train.ckpt_every={args.train_steps}", "train.log_every=20", "data.seq_len=64",
             "train.device=cpu", f"data.cache_dir={args.cache_dir}", f"train.out_dir={run}"])
    page = work / "viewer.html"
    run_cli(["sample", "--checkpoint", str(run), "--prompt", "ROMEO:", "--prompt", "JULIET:", "--num-samples", "1",
             "--sampler", args.sampler, "--steps", str(args.decode_steps), "--loops", str(args.loops),
             "--tau1", str(args.tau1), "--tau2", str(args.tau2), "--temperature", "0.7", "--device", "cpu",
             "--html", str(page)])
    document = embedded_document(page.read_text(encoding="utf-8"))
    total = len(document["steps"])
    step = total // 2 if args.step is None else args.step
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        screenshot(args.chromium, page, step, out, args.window_size, Path(profile))
    remasked = sum(len(e["remask"]) for s in document["steps"] for e in s["rows"] if e)
    print(json.dumps({"page": str(page), "screenshot": str(out), "steps": total, "shown_step": step,
                      "re_masked": remasked, "page_bytes": page.stat().st_size}))


if __name__ == "__main__":
    main_script()
