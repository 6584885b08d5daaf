#!/usr/bin/env python
"""Sample quality per network evaluation: fmconvert's solvers × grids against diffusers' schedulers.

    python scripts/samplers.py [--num-images 1000] [--nfe 3,4,5,6,8] [--models digits-eps,...] [--out docs/benchmarks/SAMPLERS.md]

On each zoo model (builtin:digits-eps, -v, -flow), from the same noise (seed 0): FID in digits
features against builtin:digits of

- every fmconvert solver on every grid that suits the source, at a step count whose counted NFE
  is the target;
- diffusers' schedulers driving the unconverted network (``--baseline`` aliases, Karras sigmas
  as an option), likewise at the target NFE (counted from the network calls);
- the converged solve of the same ODE: rk4 at 100 NFE (25 steps).

Excess FID = FID − converged FID. The targets (issue 17): where the best diffusers scheduler's
excess is above 1, fmconvert's best excess is at most half of it; where it is below, fmconvert's
best FID is at most the best diffusers FID + 0.3. Writes the Markdown tables (OUT), a plot
(OUT with .png) and the numbers (OUT with .json), with the machine and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fmconvert  # noqa: E402
from fmconvert.evaluation.fid import make_extractor, sweep  # noqa: E402
from fmconvert.math.grids import GRIDS  # noqa: E402
from fmconvert.math.solvers import SOLVERS  # noqa: E402
from fmconvert.sampling.model import load_velocity_model, sample_shape  # noqa: E402
from fmconvert.sampling.runs import OdeSampler, Run, SchedulerSampler, model_fingerprint  # noqa: E402

MODELS = ("digits-eps", "digits-v", "digits-flow")
REFERENCE = "builtin:digits"
#: diffusers' schedulers compared (aliases of fmconvert.sampling.baselines, with options), ODE samplers only
DIFFUSION_BASELINES = ("ddim", "euler", "heun", "lms", "pndm", "dpm++2m", "dpm++3m", "unipc", "deis",
                       "dpm++2m:use_karras_sigmas=true", "dpm++3m:use_karras_sigmas=true")
FLOW_BASELINES = ("default", "dpm++2m", "dpm++3m", "unipc", "deis")
#: fmconvert's solvers and grids compared (every fixed-step solver but midpoint and rk4, which lose to
#: heun and ab2 at these NFE; every grid but leading and linspace, DDIM's spacings other than trailing;
#: the uniform grid also with the time shifts 1.5 and 2, GRID:shift=K)
SOLVERS_COMPARED = ("euler", "heun", "ab2", "dpmpp_2m", "dpmpp_3m", "unipc")
GRIDS_COMPARED = ("uniform", "uniform:shift=1.5", "uniform:shift=2", "flowmatch", "trailing", "karras", "logsnr")


def parse_grid(spec: str) -> tuple[str, float | None]:
    """``GRID`` or ``GRID:shift=K`` → (grid, shift or None)."""
    grid, _, shift = spec.partition(":shift=")
    return grid, float(shift) if shift else None


def solver_steps(solver: str, nfe: int) -> int | None:
    """Steps of ``solver`` whose NFE is ``nfe`` on a grid ending at 0 (Heun: Euler into 0)."""
    per = SOLVERS[solver].evals_per_step
    if per is None:
        return None
    if solver == "heun":
        return (nfe + 1) // 2 if nfe % 2 == 1 else None
    return nfe // per if nfe % per == 0 else None


def baseline_steps(spec: str, nfe: int) -> int | None:
    """Steps of a diffusers scheduler whose network calls are ``nfe`` (Heun: 2·steps − 1; PLMS: steps + 1)."""
    name = spec.split(":")[0]
    if name == "heun":
        return (nfe + 1) // 2 if nfe % 2 == 1 else None
    if name == "pndm":
        return nfe - 1 if nfe > 2 else None
    return nfe


def runs_for(base: Run, discrete: bool, flow: bool, nfe_list: list[int], solvers=SOLVERS_COMPARED,
             grids=GRIDS_COMPARED, baselines: tuple[str, ...] | None = None) -> list[Run]:
    """The converged solve (first), then every baseline and solver/grid at each NFE."""
    grids = [parse_grid(g) for g in grids]
    grids = [(g, k) for g, k in grids if (discrete or not GRIDS[g].discrete) and (flow or g != "flowmatch")]
    runs = [converged_run(base)]
    if baselines is None:
        baselines = FLOW_BASELINES if flow else DIFFUSION_BASELINES
    elif flow:
        baselines = tuple(b for b in baselines if b.split(":")[0] in FLOW_BASELINES)
    for nfe in nfe_list:
        for spec in baselines:
            steps = baseline_steps(spec, nfe)
            if steps:
                from fmconvert.sampling.baselines import parse_baseline

                baseline, options = parse_baseline(spec)
                runs.append(dataclasses.replace(base, sampler=SchedulerSampler(baseline.name, options, baseline.grid),
                                                steps=steps))
        for solver in solvers:
            steps = solver_steps(solver, nfe)
            if steps:
                runs += [dataclasses.replace(base, sampler=OdeSampler(solver, grid, shift), steps=steps) for grid, shift in grids]
    return runs


def converged_run(base: Run) -> Run:
    """The converged solve of the same ODE: rk4 at 100 NFE (25 steps) on the uniform grid."""
    return dataclasses.replace(base, sampler=OdeSampler("rk4", "uniform"), steps=25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--nfe", default="3,4,5,6,8")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/SAMPLERS.md"))
    parser.add_argument("--solvers", default=",".join(SOLVERS_COMPARED), help="fmconvert solvers compared")
    parser.add_argument("--grids", default=",".join(GRIDS_COMPARED),
                        help="grids compared (those that suit the source), GRID or GRID:shift=K")
    parser.add_argument("--baselines", default=None, help="diffusers schedulers compared, ';'-separated (default: every ODE one listed)")
    parser.add_argument("--converged", type=Path, default=None,
                        help="a .json of an earlier run on the same noise: take each model's converged FID from it "
                             "instead of solving again")
    parser.add_argument("--render", default=None, help="comma-separated .json files of earlier runs: merge them into OUT, sample nothing")
    args = parser.parse_args()
    if args.render:
        parts = [json.loads(Path(f).read_text()) for f in args.render.split(",")]
        results: dict = {}
        for part in parts:  # (runs of one model from several files: their rows together, the first converged FID)
            for name, result in part["models"].items():
                if name in results:
                    results[name]["rows"] += [{**r, "excess": r["fid"] - results[name]["converged"]} for r in result["rows"]]
                    results[name]["failed"] = results[name].get("failed", []) + result.get("failed", [])
                else:
                    results[name] = result
        meta = {**parts[0]["meta"], "seconds": sum(p["meta"]["seconds"] for p in parts),
                "command": "; ".join(p["meta"]["command"] for p in parts)}
        nfe = sorted({r["nfe"] for m in results.values() for r in m["rows"] if not r["baseline"]})
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": results}, indent=2) + "\n")
        args.out.write_text(render(results, meta, nfe))
        plot(results, nfe, args.out.with_suffix(".png"))
        return
    torch.set_num_threads(2)
    nfe_list = [int(v) for v in args.nfe.split(",")]
    extractor = make_extractor("digits")
    results: dict = {}
    started = time.perf_counter()
    for name in args.models.split(","):
        vm = load_velocity_model(f"builtin:{name}")
        flow = vm.source.prediction_type == "flow_prediction"
        discrete = type(vm.grid_source).__name__ == "DiscreteVPSchedule"
        base = Run(model=f"builtin:{name}", fingerprint=model_fingerprint(vm.source), sampler="euler", steps=1,
                   num_images=args.num_images, shard_size=250).loaded(vm.source.model_class, sample_shape(vm))
        runs = runs_for(base, discrete, flow, nfe_list, tuple(v for v in args.solvers.split(",") if v), tuple(args.grids.split(",")),
                        tuple(b for b in args.baselines.split(";") if b) if args.baselines is not None else None)
        converged = None
        if args.converged:  # the same Run (model, noise, rk4 at 25 steps) was solved there
            earlier = json.loads(args.converged.read_text())
            if earlier["meta"]["num_images"] != args.num_images:
                sys.exit(f"--converged {args.converged}: made with {earlier['meta']['num_images']} images, not {args.num_images}")
            converged, runs = earlier["models"][name]["converged"], runs[1:]
        print(f"{name}: {len(runs)} runs", file=sys.stderr, flush=True)
        rows, failed = [], []
        for run in runs:  # one at a time: a scheduler diffusers cannot run at some setting is noted, not fatal
            try:
                rows += sweep(vm, REFERENCE, extractor, [run])["rows"]
            except Exception as error:  # noqa: BLE001 - recorded in the output
                failed.append({"sampler": run.sampler.spec if isinstance(run.sampler, SchedulerSampler)
                               else label({**run.sampler.record(), "sampler": run.sampler.name}),
                               "steps": run.steps, "error": f"{type(error).__name__}: {error}"})
        if converged is None:
            converged, rows = rows[0]["fid"], rows[1:]
        rows = [{**row, "excess": row["fid"] - converged} for row in rows]
        results[name] = {"converged": converged, "rows": rows, "failed": failed}
        args.out.with_suffix(".partial.json").write_text(json.dumps(results, indent=2) + "\n")  # (per model)
    seconds = time.perf_counter() - started
    meta = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads",
            "command": "python scripts/samplers.py " + shlex.join(sys.argv[1:]),
            "python": platform.python_version(), "torch": torch.__version__, "fmconvert": fmconvert.__version__,
            "diffusers": __import__("diffusers").__version__, "num_images": args.num_images, "seconds": round(seconds)}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": results}, indent=2) + "\n")
    args.out.write_text(render(results, meta, nfe_list))
    plot(results, nfe_list, args.out.with_suffix(".png"))
    print(f"wrote {args.out} ({seconds:.0f} s)", file=sys.stderr)


def label(row: dict) -> str:
    if row["baseline"]:
        return row["sampler"]
    return f"{row['sampler']}/{row['grid']}" + ("" if row.get("shift") is None else f":shift={row['shift']:g}")


def best(rows: list[dict], nfe: int, baseline: bool) -> dict | None:
    pool = [r for r in rows if r["nfe"] == nfe and r["baseline"] == baseline]
    return min(pool, key=lambda r: r["fid"]) if pool else None


def verdict(ours: dict, theirs: dict) -> str:
    if theirs["excess"] > 1:
        ratio = ours["excess"] / theirs["excess"]
        return f"{'met' if ratio <= 0.5 else 'missed'} (excess ratio {ratio:.2f})"
    gap = ours["fid"] - theirs["fid"]
    return f"{'met' if gap <= 0.3 else 'missed'} (FID {gap:+.2f} vs diffusers)"


def render(results: dict, meta: dict, nfe_list: list[int]) -> str:
    commands = meta.get("command", "python scripts/samplers.py").split("; ")
    lines = ["# Samplers: FID per network evaluation", "",
             f"Made in {meta['seconds']} s of compute on {meta['machine']}; python {meta['python']}, "
             f"torch {meta['torch']}, diffusers {meta['diffusers']}, fmconvert {meta['fmconvert']}, by "
             f"{'these runs, merged with --render' if len(commands) > 1 else 'this run'}:", "", "```", *commands, "```", "",
             f"FID in the zoo's digits features against {REFERENCE}, {meta['num_images']} samples per run, the same "
             "noise (seed 0) for every sampler. NFE is counted from the network calls. Excess = FID − the FID of "
             "the converged solve of the same ODE (rk4, 100 NFE). diffusers' schedulers drive the unconverted "
             "network; fmconvert's solvers drive the converted field. Target: where diffusers' best excess is "
             "above 1, fmconvert's best excess is at most half of it; else fmconvert's best FID ≤ diffusers' best + 0.3.",
             "", "![samplers](SAMPLERS.png)", ""]
    for name, result in results.items():
        rows = result["rows"]
        lines += [f"## builtin:{name} (converged FID {result['converged']:.2f})", "",
                  "| NFE | best diffusers | FID | excess | best fmconvert | FID | excess | target |",
                  "|---|---|---|---|---|---|---|---|"]
        for nfe in nfe_list:
            theirs, ours = best(rows, nfe, True), best(rows, nfe, False)
            if theirs is None or ours is None:
                continue
            lines.append(f"| {nfe} | {label(theirs)} | {theirs['fid']:.2f} | {theirs['excess']:.2f} | {label(ours)} | "
                         f"{ours['fid']:.2f} | {ours['excess']:.2f} | {verdict(ours, theirs)} |")
        ddim = {r["nfe"]: r for r in rows if r["baseline"] and r["sampler"] in ("ddim", "default")}
        checks = [(n, best(rows, n, False), ddim.get(4 * n)) for n in nfe_list if 4 * n in ddim]
        if checks:
            lines += ["", f"fmconvert's best at N NFE against {'DDIM' if 'ddim' in {r['sampler'] for r in ddim.values()} else 'its own scheduler'} at 4N:", "",
                      "| N | best fmconvert at N | FID | DDIM at 4N | FID | met |", "|---|---|---|---|---|---|"]
            lines += [f"| {n} | {label(ours)} | {ours['fid']:.2f} | {4 * n} | {theirs['fid']:.2f} | "
                      f"{'yes' if ours['fid'] <= theirs['fid'] else 'no'} |" for n, ours, theirs in checks if ours]
        lines += ["", "<details><summary>every run</summary>", "", "| sampler | steps | NFE | FID |", "|---|---|---|---|"]
        lines += [f"| {label(r)} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} |" for r in sorted(rows, key=lambda r: (r["nfe"], r["fid"]))]
        lines += ["", "</details>", ""]
        for fail in result.get("failed", []):
            lines.append(f"- not run: {fail['sampler']} at {fail['steps']} steps ({fail['error'][:160]})")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, nfe_list: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        for baseline, style in ((True, "o--"), (False, "s-")):
            points = [(n, best(result["rows"], n, baseline)) for n in nfe_list]
            points = [(n, r["fid"]) for n, r in points if r is not None]
            ax.plot(*zip(*points), style, label="best diffusers scheduler" if baseline else "best fmconvert solver/grid")
        ax.axhline(result["converged"], color="grey", lw=0.8, label="converged (rk4, 100 NFE)")
        ax.set(title=f"builtin:{name}", xlabel="NFE", ylabel="FID (digits features)", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
