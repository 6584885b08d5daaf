#!/usr/bin/env python
"""Fine-tune builtin:digits-eps with the flow-matching loss and measure what it changed: docs/benchmarks/TRAIN.md.

    python scripts/train_bench.py                       # 1,000 steps (about 10-15 minutes on the 2-core CPU)
    python scripts/train_bench.py --steps 50 --md /tmp/TRAIN.md --work /tmp/train-bench   # a quick look

What it does, in order:

1. FID of the pretrained model (digits features, against builtin:digits, ``--num-images``
   samples, ``--solver`` on the uniform grid, ``--sample-steps`` steps; the same seeds before and after);
2. ``fmconvert train builtin:digits-eps --data builtin:digits/train`` (:func:`fmconvert.training.loop.train`)
   for ``--steps`` steps into ``WORK/model`` (a rerun resumes from its checkpoint or reuses the
   finished folder);
3. the same FID of the trained folder;
4. where the loss curve starts: the first step's loss against the source's epsilon loss on the
   same draws, each sample weighted by (1 − s)⁻² (the identity that makes the two one loss), and
   the flow-matching loss on held-out digits (fixed draws) before and after.

Writes ``--md`` (default docs/benchmarks/TRAIN.md) and the loss curve beside it (TRAIN.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fmconvert.evaluation.agreement import weighted_epsilon_loss  # noqa: E402
from fmconvert.evaluation.fid import make_extractor, sweep  # noqa: E402
from fmconvert.integration.source import inspect_source  # noqa: E402
from fmconvert.sampling.model import load_velocity_model  # noqa: E402
from fmconvert.sampling.runs import Run, model_fingerprint, sweep_runs  # noqa: E402
from fmconvert.training.data import load_training_data  # noqa: E402
from fmconvert.training.loop import train  # noqa: E402
from fmconvert.training.objective import Draws, flow_matching_loss, trained_range  # noqa: E402
from fmconvert.training.settings import TIME_SAMPLINGS, TrainSettings  # noqa: E402

MODEL, DATA, HELD_OUT, REFERENCE = "builtin:digits-eps", "builtin:digits/train", "builtin:digits/held_out", "builtin:digits"


def fid_rows(model: str, solvers: list[str], steps: int, num_images: int, seed: int) -> list[dict]:
    """FID per solver (its own row: sampler, steps, NFE, FID) of ``model``."""
    vm = load_velocity_model(model)
    base = Run(model=model, fingerprint=model_fingerprint(inspect_source(model)), sampler=solvers[0], steps=steps,
               seed=seed, num_images=num_images, shard_size=250)
    return sweep(vm, REFERENCE, make_extractor("digits"), sweep_runs(base, solvers, [steps]))["rows"]


@torch.no_grad()
def held_out_loss(model: str, settings: TrainSettings, batches: int) -> float:
    """The flow-matching loss on the held-out digits, on the draws of ``batches`` steps of ``settings``
    (the same draws for every model)."""
    vm = load_velocity_model(model, compute_dtype="float64")
    data = load_training_data(HELD_OUT, (1, 8, 8), False)
    draws = Draws(settings, data, trained_range(vm.velocity))
    return sum(flow_matching_loss(vm.velocity, vm.velocity.target_path, *draws.batch(k)).mean().item()
               for k in range(batches)) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--time-sampling", default="uniform", choices=list(TIME_SAMPLINGS))
    parser.add_argument("--solver", default="euler", help="comma-separated solvers for the FID (uniform grid)")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--held-out-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "train-bench", help="the trained model and its checkpoint")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks" / "docs/benchmarks/TRAIN.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    solvers = [s.strip() for s in args.solver.split(",") if s.strip()]
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    settings = TrainSettings.create(MODEL, DATA, train_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                    warmup=args.warmup, ema_decay=args.ema_decay, time_sampling=args.time_sampling,
                                    seed=args.seed)
    out = args.work / "model"
    say(f"FID of {MODEL} before training")
    before = fid_rows(MODEL, solvers, args.sample_steps, args.num_images, args.seed)
    if (out / "training.json").is_file() and json.loads((out / "training.json").read_text())["settings"] == settings.manifest():
        say(f"reusing {out} (trained with these settings)")
        summary = json.loads((out / "training.json").read_text())
    else:
        say(f"training {args.steps} steps into {out}")
        summary = train(settings, out, checkpoint_every=100, force=True, progress=sys.stderr.isatty(), log=say)
    record = json.loads((out / "training.json").read_text())
    say("FID after training")
    after = fid_rows(str(out), solvers, args.sample_steps, args.num_images, args.seed)
    say("losses")
    vm = load_velocity_model(MODEL, compute_dtype="float64")
    x0, eps, s = Draws(settings, load_training_data(DATA, (1, 8, 8), False), trained_range(vm.velocity)).batch(0)
    with torch.no_grad():
        reference = weighted_epsilon_loss(vm.velocity, x0, eps, s).mean().item()
        unweighted = (weighted_epsilon_loss(vm.velocity, x0, eps, s) * (1 - s) ** 2).mean().item()
    held = {name: held_out_loss(model, settings, args.held_out_batches) for name, model in (("before", MODEL), ("after", str(out)))}
    losses = record["loss"]
    window = max(1, min(50, len(losses) // 4))
    md = [
        "# Fine-tuning builtin:digits-eps with the flow-matching loss",
        "",
        f"`python scripts/train_bench.py --steps {args.steps}` ({time.perf_counter() - started:.0f} s in all, "
        f"training {summary['seconds']:.0f} s on {summary['device']}, {torch.get_num_threads()} threads).",
        "",
        f"Training: `fmconvert train {MODEL} --data {DATA}` for {args.steps} steps of {args.batch_size}, AdamW lr "
        f"{args.lr:g} after {args.warmup} warm-up steps (constant), EMA {args.ema_decay:g} (the written weights), "
        f"s {args.time_sampling.replace('_', '-')} on the source's trained range "
        f"[{summary['time_range'][0]:.4f}, {summary['time_range'][1]:.4f}], seed {args.seed}. "
        f"FID: {args.num_images} samples, digits features against {REFERENCE}, the uniform grid, {args.sample_steps} "
        "steps, the same seeds before and after.",
        "",
        "| solver | steps | NFE | FID before | FID after |",
        "|---|---|---|---|---|",
    ]
    for b, a in zip(before, after):
        md.append(f"| {b['sampler']} | {b['steps']} | {b['nfe']} | {b['fid']:.3f} | {a['fid']:.3f} |")
    md += [
        "",
        "Where the loss curve starts:",
        "",
        f"- step 1's loss (batch of {args.batch_size}, the pretrained weights): {losses[0]:.6f}; the source's epsilon loss "
        f"on the same draws weighted by (1 − s)⁻²: {reference:.6f} (relative difference "
        f"{abs(losses[0] - reference) / reference:.1e}); unweighted, that epsilon loss is {unweighted:.6f};",
        f"- mean of the first {window} steps {sum(losses[:window]) / window:.5f}, of the last {window} "
        f"{sum(losses[-window:]) / window:.5f};",
        f"- flow-matching loss on the held-out digits ({args.held_out_batches} batches of {args.batch_size}, fixed draws): "
        f"{held['before']:.5f} before, {held['after']:.5f} after.",
        "",
        f"![loss]({args.md.with_suffix('.png').name})",
        "",
    ]
    args.md.write_text("\n".join(md))
    shutil.copyfile(out / "loss.png", args.md.with_suffix(".png"))
    say(f"wrote {args.md}")
    print("\n".join(md))


if __name__ == "__main__":
    main()
