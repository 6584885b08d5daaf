#!/usr/bin/env python
"""Reflow builtin:digits-eps and measure few-step sample quality before and after: docs/benchmarks/REFLOW.md.

    python scripts/reflow_bench.py             # the defaults: ~41 minutes on 2 CPU threads (below)
    python scripts/reflow_bench.py --num-couplings 300 --solver-steps 4 --train-steps 10 --distill-steps 10 \
        --distill-couplings 600 --num-images 100 --nfe 1,2 --confirm-images 200 --work /tmp/reflow-bench \
        --md /tmp/REFLOW.md    # a quick look (~15 s)

Time (measured on the 2-core CPU): a training step of 128 pairs 0.36 s, so 3,000 reflow steps
take 18 minutes and 1,600 distillation steps 9.5; the reflow's 10,000 UniPC-16 couplings 3
minutes, the distillation's 120,000 ab2-2 couplings 3.5; the FID runs (1,000 images × 3 solvers ×
2 shifts × NFE 1, 2, 4, 8, and 5 for the source; the target points again from 10,000) ~7
minutes: ~41 minutes in all.

What it does, in order (a rerun resumes every part: the couplings' shards, the training's
checkpoint, the finished models, the FID runs' samples, all under ``--work``):

1. ``fmconvert reflow builtin:digits-eps --prediction-type v_prediction --time-sampling u-shaped
   --loss-type pseudo-huber`` (:func:`fmconvert.training.reflow.reflow`): ``--num-couplings`` (noise,
   sample) pairs solved with ``--solver`` in ``--solver-steps`` steps on the uniform grid from the
   noise of seed 0, kept in ``WORK/couplings-<fingerprint>``; ``--train-steps`` steps of training
   on the straight paths between them, the epsilon network trained into v_prediction (well
   conditioned at the noise end), with Lee et al. (2024)'s U-shaped times and pseudo-Huber loss,
   into ``WORK/model``;
2. with ``--distill-steps`` > 0, ``fmconvert reflow WORK/model --distill``: ``--distill-couplings``
   couplings of the reflowed model (seed 0 too; ``--distill-solver`` in ``--distill-solver-steps``
   steps with ``--distill-shift``: many and cheap, since the one-step map overfits a few), trained at
   s = 1 only into ``WORK/distilled``, the one-step model; its one-step error on its couplings
   and on held-out ones;
3. FID (digits features against builtin:digits, ``--num-images`` samples from the noise of
   ``--fid-seed``, 1: noise no model was trained on) of the source and of the reflowed model with
   euler, ab2 and unipc on the uniform grid with time shifts 1 and 2, at every NFE of ``--nfe``
   (the source also at 5 NFE: the target's reference), best per NFE; of the distilled model, one
   Euler step;
4. the targets (issue 18): at 2 NFE the reflowed model's FID is at most the source's best at
   5 NFE, and at 1 NFE at most twice that.

Writes ``--md`` (default docs/benchmarks/REFLOW.md), the numbers beside it (.json) and the loss curve (.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fmconvert  # noqa: E402
from fmconvert.evaluation.fid import make_extractor, sweep  # noqa: E402
from fmconvert.integration.source import inspect_source  # noqa: E402
from fmconvert.sampling.model import load_velocity_model  # noqa: E402
from fmconvert.sampling.runs import OdeSampler, Run, model_fingerprint, run_fingerprint, solver_options  # noqa: E402
from fmconvert.training.reflow import reflow  # noqa: E402
from fmconvert.training.settings import LOSS_TYPES, TIME_SAMPLINGS  # noqa: E402

MODEL, REFERENCE = "builtin:digits-eps", "builtin:digits"
SOLVERS = ("euler", "ab2", "unipc")
SHIFTS = (1.0, 2.0)
REFERENCE_NFE = 5  # the target: the reflowed model at 2 NFE against the source's best here
COUPLINGS_SEED = 0  # both stages' couplings; the FID runs take --fid-seed


def fid_rows(model: str, nfe_list: list[int], num_images: int, work: Path, seed: int, solvers: tuple[str, ...] = SOLVERS,
             shifts: tuple[float, ...] = SHIFTS) -> list[dict]:
    """FID of every solver × shift at every NFE (1 evaluation a step: steps = NFE) of ``model`` from the noise of
    ``seed``; samples kept under WORK/fid/<the model's fingerprint>/seed<seed>/ (a rerun reuses them, another model
    gets its own folder)."""
    fingerprint = model_fingerprint(inspect_source(model))
    vm = load_velocity_model(model)
    base = Run(model=model, fingerprint=fingerprint, sampler="euler", steps=1, num_images=num_images, shard_size=250,
               seed=seed)
    runs = [dataclasses.replace(base, sampler=OdeSampler(solver, shift=shift, options=solver_options(solver)), steps=nfe)
            for nfe in nfe_list for solver in solvers for shift in shifts
            if nfe > 1 or (solver, shift) == (solvers[0], shifts[0])]  # (one step from s = 1: every solver is Euler)
    folder = work / "fid" / fingerprint.split(":")[-1][:16] / f"seed{seed}"
    return sweep(vm, REFERENCE, make_extractor("digits"), runs, samples_dir=folder)["rows"]


def best(rows: list[dict], nfe: int) -> dict:
    return min((r for r in rows if r["nfe"] == nfe), key=lambda r: r["fid"])


def label(row: dict) -> str:
    return f"{row['sampler']}, shift {row['shift']:g}"


def couplings_run(model: str, solver: str, shift: float | None, num_couplings: int, solver_steps: int,
                  seed: int = COUPLINGS_SEED) -> Run:
    return Run(model=model, fingerprint=model_fingerprint(inspect_source(model)),
               sampler=OdeSampler(solver, shift=shift, options=solver_options(solver)), steps=solver_steps,
               num_images=num_couplings, shard_size=250, seed=seed)


def couplings_folder(work: Path, couplings: Run) -> Path:
    """Where the bench keeps a couplings run's shards: WORK/couplings-<its fingerprint>."""
    return work / f"couplings-{run_fingerprint(couplings).split(':')[-1][:12]}"


def one_step_errors(student: Path, trained: Run, work: Path, held_seed: int, count: int = 2000) -> dict[str, float]:
    """The distillation loss (mean square of one Euler step's error against the coupled sample) of ``student`` on
    ``count`` of its training couplings (the run ``trained``) and on ``count`` couplings of the same run from the
    held-out noise of ``held_seed``: how far the one-step map generalises beyond the couplings it saw."""
    from fmconvert.training.objective import flow_matching_loss
    from fmconvert.training.reflow import draw_couplings, load_couplings

    count = min(count, trained.num_images)
    held = dataclasses.replace(trained, num_images=count, seed=held_seed)
    held, _ = draw_couplings(held, couplings_folder(work, held))
    velocity = load_velocity_model(str(student)).velocity
    errors = {}
    for name, run in (("train", trained), ("held_out", held)):
        data = load_couplings(couplings_folder(work, run), run.loaded(held.model_class, held.shape))
        with torch.no_grad():
            errors[name] = flow_matching_loss(velocity, velocity.target_path, data.x0(torch.arange(count)), data.noise[:count],
                                              torch.ones(count, dtype=torch.float64)).mean().item()
    return {**errors, "count": count}


def stage(name: str, model: str, out: Path, args: argparse.Namespace, training: dict, distill: bool, say,
          couplings: Run) -> dict:
    """``fmconvert reflow model`` (with ``distill``: ``--distill``) into ``out``, its couplings in
    WORK/couplings-<their run's fingerprint>; a finished ``out`` of the same settings is reused. The stage's wall
    time (couplings and training) goes into WORK/timing.json under "<name>_seconds", so a rerun that reuses the
    model still reports what making it took. Returns its training.json."""
    wanted = {**training, "couplings": run_fingerprint(couplings), "distill": distill}
    if (out / "training.json").is_file() and all(
            json.loads((out / "training.json").read_text())["settings"].get(k) == v for k, v in wanted.items()):
        say(f"reusing {out} (trained with these settings)")
        return json.loads((out / "training.json").read_text())
    say(f"{'distill' if distill else 'reflow'} {model}: {couplings.describe()}, {training['train_steps']} training steps "
        f"into {out}")
    t0 = time.perf_counter()
    reflow(couplings, out, distill=distill, couplings_dir=couplings_folder(args.work, couplings), checkpoint_every=100,
           force=True, progress=sys.stderr.isatty(), log=say, **training)
    timing_file = args.work / "timing.json"
    made = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    timing_file.write_text(json.dumps({**made, f"{name}_seconds": round(time.perf_counter() - t0)}) + "\n")
    return json.loads((out / "training.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "reflow-bench", help="couplings, models, checkpoints, FID samples")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks" / "docs/benchmarks/REFLOW.md")
    parser.add_argument("--num-couplings", type=int, default=10000, help="couplings of each stage")
    parser.add_argument("--solver", default="unipc", help="the couplings' solver (uniform grid)")
    parser.add_argument("--solver-steps", type=int, default=16, help="the couplings' solver steps")
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--time-sampling", default="u_shaped", choices=list(TIME_SAMPLINGS))
    parser.add_argument("--logit-mean", type=float, default=0.0)
    parser.add_argument("--logit-std", type=float, default=1.0)
    parser.add_argument("--u-shape-a", type=float, default=4.0)
    parser.add_argument("--loss-type", default="pseudo_huber", choices=list(LOSS_TYPES), help="both stages' loss")
    parser.add_argument("--prediction-type", default="v_prediction",
                        help="what the reflowed network predicts ('' : what the source's predicts, epsilon)")
    parser.add_argument("--distill-steps", type=int, default=1600,
                        help="then distil the reflowed model to one step on its own couplings (0: no)")
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    parser.add_argument("--distill-ema-decay", type=float, default=0.995)
    parser.add_argument("--distill-couplings", type=int, default=120000,
                        help="the reflowed model's couplings: the one-step map overfits fewer (one-step error on 10,000 "
                             "couplings 0.0015, on held-out ones 0.013), so they are many and cheap")
    parser.add_argument("--distill-solver", default="ab2", help="their solver")
    parser.add_argument("--distill-shift", type=float, default=2.0, help="its grid's time shift")
    parser.add_argument("--distill-solver-steps", type=int, default=2,
                        help="its steps (the reflowed model at 2 NFE, ab2 with shift 2, is at the source's 8-NFE FID)")
    parser.add_argument("--confirm-images", type=int, default=10000,
                        help="re-measure the target points with this many images (FID from 1,000 is biased upwards by "
                             "several units and varies by seed); 0: no")
    parser.add_argument("--nfe", default="1,2,4,8")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--fid-seed", type=int, default=1,
                        help="the FID runs' noise; not the couplings' (seed 0): a model is not scored on the noise it was trained on")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    nfe_list = [int(v) for v in args.nfe.split(",")]
    if args.fid_seed == COUPLINGS_SEED:
        parser.error(f"--fid-seed {args.fid_seed} is the couplings' noise: the models would be scored on what they were trained on")
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    training = dict(train_steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                    ema_decay=args.ema_decay, time_sampling=args.time_sampling, logit_mean=args.logit_mean,
                    logit_std=args.logit_std, u_shape_a=args.u_shape_a, loss_type=args.loss_type,
                    prediction_type=args.prediction_type or None, seed=COUPLINGS_SEED)
    out, distilled_out = args.work / "model", args.work / "distilled"
    record = stage("reflow", MODEL, out, args, training, False, say,
                   couplings_run(MODEL, args.solver, None, args.num_couplings, args.solver_steps))
    distilled = None
    if args.distill_steps:
        distill_training = {**training, "train_steps": args.distill_steps, "lr": args.distill_lr,
                            "ema_decay": args.distill_ema_decay, "prediction_type": None}
        distill_couplings = couplings_run(str(out), args.distill_solver, args.distill_shift, args.distill_couplings,
                                          args.distill_solver_steps)
        distilled = stage("distill", str(out), distilled_out, args, distill_training, True, say, distill_couplings)
        say("the distilled model's one-step error on its couplings and on held-out ones")
        distilled["one_step_errors"] = one_step_errors(distilled_out, distill_couplings, args.work, args.fid_seed)
    timing_file = args.work / "timing.json"
    timing: dict[str, int] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    say("FID of the source")
    t0 = time.perf_counter()
    source = fid_rows(MODEL, sorted(set(nfe_list) | {REFERENCE_NFE}), args.num_images, args.work, args.fid_seed)
    say("FID of the reflowed model")
    reflowed = fid_rows(str(out), nfe_list, args.num_images, args.work, args.fid_seed)
    one_step = []
    if distilled is not None:
        say("FID of the distilled model at 1 NFE")
        one_step = fid_rows(str(distilled_out), [1], args.num_images, args.work, args.fid_seed, solvers=("euler",),
                            shifts=(1.0,))
    # the target points again, from more images
    points = {"source": (MODEL, best(source, REFERENCE_NFE))}
    if 2 in nfe_list:
        points["reflowed"] = (str(out), best(reflowed, 2))
    if one_step:
        points["distilled"] = (str(distilled_out), one_step[0])
    confirmed: dict[str, dict] = {}
    if args.confirm_images:
        say(f"the target points again from {args.confirm_images} images")
        for name, (model, row) in points.items():
            confirmed[name] = fid_rows(model, [row["nfe"]], args.confirm_images, args.work / f"confirm{args.confirm_images}",
                                       args.fid_seed, solvers=(row["sampler"],), shifts=(row["shift"],))[0]
    timing["fid_seconds"] = round(time.perf_counter() - t0)
    seconds = round(time.perf_counter() - started)
    if distilled is None:
        timing.pop("distill_seconds", None)
    meta = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads",
            "command": "python scripts/reflow_bench.py " + " ".join(sys.argv[1:]), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
            "fmconvert": fmconvert.__version__, "seconds": seconds, **timing,
            "training_seconds": record["seconds"],
            **({"distill_training_seconds": distilled["seconds"]} if distilled is not None else {})}
    strip = lambda r: {k: v for k, v in r.items() if k != "loss"}  # noqa: E731
    args.md.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "source": source, "reflowed": reflowed, "distilled": one_step, "confirmed": confirmed,
         "training": strip(record),
         "distill_training": strip(distilled) if distilled is not None else None}, indent=2) + "\n")
    reference = best(source, REFERENCE_NFE)

    def loss_words(losses: list[float]) -> str:
        window = max(1, min(100, len(losses) // 4))
        return (f"mean of the first {window} steps {sum(losses[:window]) / window:.4g}, of the last {window} "
                f"{sum(losses[-window:]) / window:.4g}")

    predicts = record["settings"].get("prediction_type") or "epsilon (the source's)"
    md = [
        "# Reflow of builtin:digits-eps",
        "",
        f"Made by `{meta['command']}` on {meta['machine']}; python {meta['python']}, torch {meta['torch']}, diffusers "
        f"{meta['diffusers']}, fmconvert {meta['fmconvert']}. Time: the reflow {timing.get('reflow_seconds', '?')} s "
        f"(couplings, then {record['seconds']:.0f} s of training)"
        + (f", the distillation {timing.get('distill_seconds', '?')} s (couplings, then {distilled['seconds']:.0f} s of "
           "training)" if distilled is not None else "")
        + f", the FID runs {timing['fid_seconds']} s (samples drawn by an earlier run of the same settings are reused: "
        f"from scratch they take ~7 minutes); this run {seconds} s.",
        "",
        f"1. Reflow: {args.num_couplings} couplings (noise, sample) of {MODEL}, {args.solver} in {args.solver_steps} steps "
        f"on the uniform grid (seed {COUPLINGS_SEED}); {args.train_steps} steps of {args.batch_size} pairs, the network trained to "
        f"predict {predicts}, AdamW lr {args.lr:g} after {args.warmup} warm-up steps, EMA {args.ema_decay:g}, "
        f"s {args.time_sampling.replace('_', '-')}"
        + (f" (m {args.logit_mean:g}, σ {args.logit_std:g})" if args.time_sampling == "logit_normal" else "")
        + (f" (a {args.u_shape_a:g}, Lee et al. 2024)" if args.time_sampling == "u_shaped" else "")
        + f" on the trained range [{record['time_range'][0]:.4f}, {record['time_range'][1]:.4f}], "
        + ("the flow-matching loss (l2)" if args.loss_type == "l2" else f"the {args.loss_type.replace('_', '-')} loss")
        + "; loss: "
        + loss_words(record["loss"]) + ".",
    ]
    if distilled is not None:
        md += [f"2. Distillation of the reflowed model (`fmconvert reflow --distill`): {args.distill_couplings} couplings "
               f"of its own, {args.distill_solver} in {args.distill_solver_steps} steps (shift {args.distill_shift:g}); "
               f"{args.distill_steps} steps at s = 1 only, "
               f"lr {args.distill_lr:g}, EMA {args.distill_ema_decay:g}, the rest as above; loss: "
               + loss_words(distilled["loss"]) + ". Its one-step error (mean square against the coupled sample) on "
               f"{distilled['one_step_errors']['count']} of its couplings {distilled['one_step_errors']['train']:.4g}, on as many "
               f"from held-out noise (seed "
               f"{args.fid_seed}) {distilled['one_step_errors']['held_out']:.4g}: the gap is what more couplings close."]
    md += [
        "",
        f"FID in digits features against {REFERENCE}, {args.num_images} samples from the noise of seed {args.fid_seed} for "
        f"every run (held out: no coupling's noise); the best of "
        f"{', '.join(SOLVERS)} on the uniform grid with time shift {' or '.join(f'{k:g}' for k in SHIFTS)} at each NFE"
        + ("; the distilled model: one Euler step." if distilled is not None else "."),
        "",
        "| NFE | source: best | FID | reflowed: best | FID |" + (" distilled |" if distilled is not None else ""),
        "|---|---|---|---|---|" + ("---|" if distilled is not None else ""),
    ]
    for nfe in nfe_list:
        a, b = best(source, nfe), best(reflowed, nfe)
        extra = ""
        if distilled is not None:
            extra = f" {one_step[0]['fid']:.2f} |" if nfe == 1 else " |"
        md.append(f"| {nfe} | {label(a)} | {a['fid']:.2f} | {label(b)} | {b['fid']:.2f} |{extra}")
    md += ["", f"Targets: at 2 NFE at most the source's best at {REFERENCE_NFE} NFE, at 1 NFE at most twice that "
           f"(the reflowed model at 2 NFE; the better of the reflowed and the distilled model at 1 NFE):", "",
           "| images | source at 5 NFE | 2 NFE | limit | | 1 NFE | limit | |", "|---|---|---|---|---|---|---|---|"]
    sizes = [(args.num_images, {"source": reference, "reflowed": best(reflowed, 2) if 2 in nfe_list else None,
                                "distilled": one_step[0] if one_step else None, "reflowed1": best(reflowed, 1)})]
    if confirmed:
        sizes.append((args.confirm_images, {"source": confirmed["source"], "reflowed": confirmed.get("reflowed"),
                                            "distilled": confirmed.get("distilled"), "reflowed1": None}))
    verdicts = []
    for images, rows in sizes:
        ref = rows["source"]["fid"]
        two = rows["reflowed"]["fid"] if rows["reflowed"] else float("nan")
        one = min(r["fid"] for r in (rows["distilled"], rows["reflowed1"]) if r is not None)
        verdicts = [two <= ref, one <= 2 * ref]
        md.append(f"| {images} | {ref:.2f} | {two:.2f} | {ref:.2f} | {'met' if verdicts[0] else 'missed'} | {one:.2f} | "
                  f"{2 * ref:.2f} | {'met' if verdicts[1] else 'missed'} |")
    md += ["", f"On the {'confirming' if confirmed else ''} measurement ({sizes[-1][0]} images): 2 NFE "
           f"{'met' if verdicts[0] else 'missed'}, 1 NFE {'met' if verdicts[1] else 'missed'}. The samplers are those "
           f"best at {args.num_images} images (source at {REFERENCE_NFE} NFE: {label(reference)}"
           + (f"; reflowed at 2 NFE: {label(best(reflowed, 2))}" if 2 in nfe_list else "") + ")."]
    md += ["", f"![loss]({args.md.with_suffix('.png').name})", "", "<details><summary>every run</summary>", "",
           "| model | sampler | shift | NFE | FID |", "|---|---|---|---|---|"]
    for name, rows in (("source", source), ("reflowed", reflowed), ("distilled", one_step)):
        md += [f"| {name} | {r['sampler']} | {r['shift']:g} | {r['nfe']} | {r['fid']:.2f} |"
               for r in sorted(rows, key=lambda r: (r["nfe"], r["fid"]))]
    md += ["", "</details>", ""]
    shutil.copyfile(out / "loss.png", args.md.with_suffix(".png"))
    args.md.write_text("\n".join(md))
    print("\n".join(md))
    say(f"wrote {args.md}, {args.md.with_suffix('.json').name} and {args.md.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
