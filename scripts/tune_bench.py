#!/usr/bin/env python
"""Tuned grids against the best untuned ones: fmconvert tune on the zoo models, judged on held-out noise.

    python scripts/tune_bench.py [--models digits-eps,...] [--nfe 3,4,5,6] [--solver ab2] [--num-images 2000]
                                 [--methods gits,ld3,s4s] [--objective mse|features|frechet] [--select loss|fid]
                                 [--lr-schedule constant|cosine] [--pairs 128]
                                 [--out docs/benchmarks/TUNING.md]

For each zoo model and NFE: ``fmconvert.sampling.tuned.tune`` (GITS and LD3; the settings below),
then FID in digits features against builtin:digits of ``--num-images`` samples from seed 1000 (neither
the tuning seed 0 nor the validation seed 1) for: the converged solve (rk4, 25 steps, 100 NFE, as
docs/benchmarks/SAMPLERS.md; the teacher is rk4 in 64 steps), ``--solver auto`` (the default sampler), the best
untuned grid (the one tuning ranked first on its pairs) and each tuned grid, all with the same solver and noise.
Also the held-out RMSE to the teacher and the tuning seconds on this machine. Excess FID = FID − converged FID;
the ratios are the tuned excess over the untuned one's and over auto's.
Writes OUT (Markdown) and OUT with .json (every number and setting); ``--keep-files DIR`` also the
tuned sampler files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fmconvert  # noqa: E402
from fmconvert.evaluation.fid import frechet_selection, make_extractor, sweep  # noqa: E402
from fmconvert.sampling import distributed  # noqa: E402
from fmconvert.sampling.model import load_velocity_model, sample_shape  # noqa: E402
from fmconvert.sampling.runs import TUNED, OdeSampler, Run, model_fingerprint  # noqa: E402
from fmconvert.sampling.tuned import tune  # noqa: E402

SETTINGS = {"pairs": 128, "validation_pairs": 256, "teacher_steps": 64, "fine_steps": 64, "iterations": 150,
            "lr": 0.1, "batch_size": 32}


def ratio(excess: float, reference: float) -> float | None:
    """excess ÷ reference, None where the reference's excess is not positive (its FID at or below the
    converged solve's, within the estimate's noise: a ratio would mean nothing; the FIDs are compared instead)."""
    return excess / reference if reference > 0 else None


def cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def untuned_sampler(solver: str, name: str) -> OdeSampler:
    grid, _, shift = name.partition("@")
    return OdeSampler(solver, grid, float(shift) if shift else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits-eps,digits-v,digits-flow")
    parser.add_argument("--nfe", default="3,4,5,6")
    parser.add_argument("--methods", default="gits,ld3,s4s")
    parser.add_argument("--objective", default="mse")
    parser.add_argument("--select", default="loss", choices=("loss", "fid"))
    parser.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    parser.add_argument("--solver", default="ab2")
    parser.add_argument("--pairs", type=int, default=SETTINGS["pairs"], help="teacher pairs tuned on (seed 0)")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/TUNING.md"))
    parser.add_argument("--keep-files", type=Path, default=None, help="Also write each model's tuned sampler file here.")
    args = parser.parse_args()
    nfe_list = [int(n) for n in args.nfe.split(",")]
    # (objective frechet: all the pairs each iteration, as the command line's default for it)
    settings = {**SETTINGS, "pairs": args.pairs, "lr_schedule": args.lr_schedule,
                **({"batch_size": None} if args.objective == "frechet" else {})}
    extractor = make_extractor("digits")
    rows, started = [], time.time()
    for name in args.models.split(","):
        model = f"builtin:{name}"
        vm = load_velocity_model(model)
        fingerprint = model_fingerprint(vm.source)
        tuned = tune(vm, fingerprint, nfe_list, args.solver, methods=tuple(args.methods.split(",")),
                     objective=args.objective, selection=frechet_selection(extractor) if args.select == "fid" else None,
                     **settings)
        if args.keep_files is not None:
            tuned.save(args.keep_files / f"{name}-{args.solver}.json")
        base = Run(model=model, fingerprint=fingerprint, sampler=OdeSampler("rk4"), steps=25, seed=1000,
                   num_images=args.num_images, shard_size=500).loaded(vm.source.model_class, sample_shape(vm))
        runs = [base] + [dataclasses.replace(base, sampler=OdeSampler("auto"), steps=nfe) for nfe in nfe_list]
        for g in tuned.grids:
            runs.append(dataclasses.replace(base, sampler=untuned_sampler(g.solver, g.validation["best_untuned"]),
                                            steps=g.steps))
            runs.append(dataclasses.replace(base, sampler=OdeSampler(g.solver, TUNED, times=g.s, weights=g.weights),
                                            steps=g.steps))
        result = sweep(vm, "builtin:digits", extractor, runs)
        fids = [row["fid"] for row in result["rows"]]
        converged, auto = fids[0], dict(zip(nfe_list, fids[1:1 + len(nfe_list)]))
        for k, g in enumerate(tuned.grids):
            untuned_fid, tuned_fid = fids[1 + len(nfe_list) + 2 * k], fids[2 + len(nfe_list) + 2 * k]
            rows.append({"model": name, "nfe": g.nfe, "method": g.method, "solver": g.solver,
                         "best_untuned": g.validation["best_untuned"], "converged_fid": converged,
                         "untuned_fid": untuned_fid, "tuned_fid": tuned_fid, "auto_fid": auto[g.nfe],
                         "excess_ratio": ratio(tuned_fid - converged, untuned_fid - converged),
                         "auto_excess_ratio": ratio(tuned_fid - converged, auto[g.nfe] - converged),
                         "untuned_rmse": g.validation["best_untuned_rmse"], "tuned_rmse": g.rmse,
                         "rmse_ratio": g.rmse / g.validation["best_untuned_rmse"], **least_untuned(g.validation, g.rmse),
                         "seconds": g.tuning["seconds"],
                         "score": g.validation.get("score"),
                         "s": list(g.s), "weights": None if g.weights is None else list(g.weights)})
            print(json.dumps(rows[-1]), flush=True)
    record = {"settings": {**settings, "objective": args.objective, "select": args.select},
              "num_images": args.num_images, "fid_seed": 1000, "rows": rows,
              "seconds": round(time.time() - started, 1), "fmconvert": fmconvert.__version__, "torch": torch.__version__,
              "machine": distributed.machine()}
    record["solver"] = args.solver
    write(record, args.out)


def least_untuned(validation: dict, rmse: float) -> dict:
    """The untuned grid of least held-out RMSE, its RMSE and the tuned grid's ``rmse`` over it: the issue's RMSE
    target's measure ("at most half of the best untuned solver's"). The start grid (``best_untuned``) is another
    where tuning chose it by FID (``--select fid``: uniform@1.5 on digits-v, whose RMSE at 4 NFE is 0.136 against
    uniform's 0.119), so a ratio against it reads lower than the target's."""
    name = min(validation["untuned_rmse"], key=validation["untuned_rmse"].__getitem__)
    least = validation["untuned_rmse"][name]
    return {"least_untuned": name, "least_untuned_rmse": least, "least_rmse_ratio": rmse / least}


def write(record: dict, out: Path) -> None:
    """OUT (Markdown) and OUT with .json from a run's record."""
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    select = record["settings"].get("select", "loss")
    scored = any(r.get("score") is not None for r in record["rows"])  # (rows of a run that chose by a held-out score)
    least = all("least_rmse_ratio" in r for r in record["rows"])  # (rows of runs since 2026-12-08 record it)
    chosen = "" if select == "loss" else f", chosen by {select}"
    # (merged runs: one a solver; records from before --solver, TUNING.json's, tuned ab2 and name none)
    solvers = sorted({r.get("solver", record.get("solver", "ab2")) for r in record["rows"]})
    lines = [f"# Tuned grids ({', '.join(solvers)}, objective {record['settings']['objective']}{chosen}) against the best untuned "
             "grid and the default", "",
             f"Written by `scripts/tune_bench.py` ({record['seconds']} s on {record['machine']}). FID in digits features "
             f"against builtin:digits from {record['num_images']} samples of seed 1000 (held out: tuning used seed 0, its "
             "validation seed 1); the same solver and noise in each row. Excess = FID − the converged solve's (rk4, "
             "25 steps, 100 NFE). Ratios: the tuned excess over the best untuned grid's and over `--solver auto`'s "
             "(the default sampler); — where that excess is not positive (FID at or below the converged solve's: "
             "compare the FIDs). RMSE: to the teacher's endpoints on 256 held-out pairs; RMSE untuned and RMSE ratio: "
             "the best untuned grid's (the one tuning started from)"
             + ("; ratio to least: the tuned RMSE over that of the untuned grid of least held-out RMSE (named), the "
                "measure of issue 28's RMSE target" if least else "")
             + ("; held-out score: FID to the teacher's endpoints on those pairs, by which the grid was kept" if scored else "")
             + ". Settings: "
             + ", ".join(f"{k} {v}" for k, v in record["settings"].items()) + ".", "",
             "| model | NFE | method | best untuned grid | FID untuned | FID auto | FID tuned | excess ratio | ratio to auto "
             "| RMSE untuned | RMSE tuned | RMSE ratio |" + (" ratio to least |" if least else "") + " tuning s |"
             + (" held-out score |" if scored else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if least else "") + ("---|" if scored else "")]
    for r in record["rows"]:
        method = r["method"] + (f" ({r['solver']})" if len(solvers) > 1 else "")
        lines.append(f"| {r['model']} | {r['nfe']} | {method} | {r['best_untuned']} | {r['untuned_fid']:.2f} | "
                     f"{r['auto_fid']:.2f} | {r['tuned_fid']:.2f} | {cell(r['excess_ratio'])} | "
                     f"{cell(r['auto_excess_ratio'])} | {r['untuned_rmse']:.4f} | {r['tuned_rmse']:.4f} | "
                     f"{r['rmse_ratio']:.2f} |" + (f" {r['least_rmse_ratio']:.2f} ({r['least_untuned']}) |" if least else "")
                     + f" {r['seconds']:.0f} |" + (f" {cell(r.get('score'))} |" if scored else ""))
    lines += ["", "Converged FID: " + ", ".join(sorted({f"{r['model']} {r['converged_fid']:.2f}"
                                                       for r in record["rows"]})) + "."]
    lines += [f"\nNote: {note}" for note in record.get("notes", [])]  # (added to the .json by hand, with the reason)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
