#!/usr/bin/env python
"""Quality of the bundled digits models through fmconvert: a table.

    python scripts/zoo_quality.py [--num-images 1000] [--steps 50] [--solver euler] [--grid uniform] [--json]

For each of builtin:digits-eps, -v and -flow: N samples with fmconvert's sampler, the
fraction the digits classifier gives probability >= 0.9, the smallest and largest class
share, and FID in digits features against the 1,797 real digits, beside the real-vs-real
floor (train split against held-out split).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmconvert.evaluation.quality import digits_quality, real_floor_fid  # noqa: E402
from fmconvert.sampling.generate import generate  # noqa: E402
from fmconvert.sampling.model import load_velocity_model  # noqa: E402
from fmconvert.zoo.digits import load_classifier  # noqa: E402

MODELS = ("digits-eps", "digits-v", "digits-flow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--grid", default="uniform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    classifier = load_classifier()
    rows = {}
    for name in MODELS:
        started = time.perf_counter()
        vm = load_velocity_model(f"builtin:{name}")
        result = generate(vm, args.num_images, 250, args.seed, args.solver, args.grid, args.steps)
        quality = digits_quality(result.images, classifier)
        rows[name] = {**quality.as_dict(), "nfe": max(result.nfe), "seconds": round(time.perf_counter() - started, 1)}
    floor = real_floor_fid(classifier)
    if args.json:
        print(json.dumps({"settings": vars(args), "models": rows, "real_vs_real_fid": floor}, indent=2))
        return
    print(f"{args.num_images} samples per model, {args.solver} on the {args.grid} grid, {args.steps} steps (seed {args.seed})")
    print("| model | p>=0.9 | min class | max class | FID (digits features) | NFE | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        shares = row["class_fractions"]
        print(f"| builtin:{name} | {row['confident']:.1%} | {min(shares):.1%} | {max(shares):.1%} | {row['fid']:.3f} | "
              f"{row['nfe']} | {row['seconds']} |")
    print(f"| real train vs held-out (floor) | | | | {floor:.3f} | | |")


if __name__ == "__main__":
    main()
