"""Where a looped model's core output goes beyond the trained loop count: for a trained run, the relative step
|h_{s+1} - h_s| / |h_s| of the core output after loop s, its cosine to the output after loop S_max, and the masked
answer cross-entropy when the coda reads out after loop s (one training batch with half of the answer masked).

    python experiments/loop_drift.py runs/study/loop_study/sudoku4-2000/loopmdm-s0 [--loops 24]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from common import REPO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained run folder (or checkpoint) of a generated task")
    parser.add_argument("--loops", type=int, default=24, help="the largest S analysed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from loopdlm.workflow import build_run, load_pretrained

    loaded = load_pretrained(args.run)
    config = copy.deepcopy(loaded.config)
    config.train.out_dir, config.train.threads = "/tmp/loop_drift_unused", 1
    batch = build_run(config, resume=False).trainer.train_source.next_batch()
    generator = torch.Generator().manual_seed(args.seed)
    masked = batch.noisable & (torch.rand(batch.x0.shape, generator=generator) < 0.5)
    noisy = torch.where(masked, torch.full_like(batch.x0, loaded.tokenizer.mask_id), batch.x0)
    s_max, model = loaded.config.model.max_loops, loaded.model
    with torch.no_grad():
        hidden = model(noisy, loops=args.loops, return_hidden=True).loop_hidden  # [B, L, D] after every loop
        print("loop  rel. step  cos to h_S_max  masked CE")
        for s in range(1, args.loops + 1):
            step = ((hidden[s] - hidden[s - 1]).norm(dim=-1) / hidden[s - 1].norm(dim=-1)).mean() \
                if s < args.loops else float("nan")
            cosine = F.cosine_similarity(hidden[s - 1], hidden[s_max - 1], dim=-1).mean()
            logits = model(noisy, loops=s, readout_mask=masked).logits  # [N, V] at the masked positions
            print(f"{s:4d}  {step:9.3f}  {cosine:14.3f}  {F.cross_entropy(logits, batch.x0[masked]):9.4f}")


if __name__ == "__main__":
    main()
