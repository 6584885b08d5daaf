"""The full story for one diffusion model, as a folder: convert, look, agree, FID.

``fmconvert report builtin:digits-eps --other builtin:digits-flow --out report`` writes

- ``converted/``: the converted pipeline (``fmconvert wrap``);
- ``samples.png``: the converted model's Euler samples beside the source's own DDIM
  samples from the same seeds (``converted-euler.png``, ``source-ddim.png`` alone);
- ``agreement.png``, ``fid.png``: field agreement against s, FID against NFE;
- ``samplers.png``: at few steps, the default sampler (``--solver auto``) and a sampler tuned to the
  model (``fmconvert tune``, its file ``tuned_sampler.json``) against diffusers' schedulers (the
  peers: DPM-Solver++ 2M and UniPC) driving the unconverted network, from the same noise, each
  judged by its excess FID over a converged solve;
- ``report.md`` with every table, and ``report.json`` with every number.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from fmconvert import __version__


def _plot_agreement(s_values, series: dict[str, list[float]], path: Path, title: str, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmconvert.files.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, values in series.items():
        ax.plot(s_values, [max(v, 1e-17) for v in values], marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("s (0 data, 1 noise)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def _side_by_side(left: torch.Tensor, right: torch.Tensor, path: Path) -> Path:
    from fmconvert.files.atomic import atomic_write
    from fmconvert.files.images import _pil, make_grid

    a, b = make_grid(left, columns=8), make_grid(right, columns=8)
    gap = torch.full((a.shape[0], a.shape[1], 12), 255, dtype=torch.uint8)
    image = torch.cat([a, gap, b], dim=2)
    return atomic_write(path, lambda tmp: _pil(image).save(tmp, format="PNG"))


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


#: the peers the report's sampler comparison runs (diffusers' best at few steps on the zoo: docs/benchmarks/PEERS.md)
PEERS = ("dpm++2m", "unipc")
#: how the report tunes: ``fmconvert tune``'s solver, method and objective (LD3 on the squared distance, tune's default
#: objective: on digits-eps at 4 NFE the tuned sampler closest to the default, docs/benchmarks/TUNING*.md)
TUNE_SOLVER, TUNE_METHODS, TUNE_OBJECTIVE = "ab2", ("ld3",), "mse"


def build_report(model: str = "builtin:digits-eps", other: str | None = "builtin:digits-flow", out: Path = Path("report"),
                 data: str = "builtin:digits/held_out", reference: str = "builtin:digits", steps=(4, 8, 16, 32),
                 solvers=("euler", "heun"), num_images: int = 1000, num_times: int = 20, seed: int = 0,
                 peers: tuple[str, ...] = PEERS, sampler_steps: tuple[int, ...] = (3, 4, 6), tune_steps: tuple[int, ...] = (4,),
                 tune_pairs: int = 128, tune_validation_pairs: int = 256, tune_iterations: int = 150,
                 tune_teacher_steps: int = 64, device: str = "cpu", force: bool = False, progress: bool = False,
                 log=print) -> dict:
    """The report folder ``out`` (see the module docstring) for the diffusion source ``model``. ``steps`` and
    ``solvers``: the FID sweep against DDIM; ``sampler_steps``: the NFEs at which the default sampler and
    ``peers`` (baseline specs of :mod:`fmconvert.sampling.baselines`) are compared, ``tune_steps`` those
    (among them) a sampler is tuned for (:data:`TUNE_SOLVER`, :data:`TUNE_METHODS`, :data:`TUNE_OBJECTIVE`;
    empty: none), on ``tune_pairs`` teacher pairs judged on ``tune_validation_pairs`` held-out ones, in
    ``tune_iterations`` descent steps against a teacher of ``tune_teacher_steps`` steps (``fmconvert tune``'s
    ``pairs``, ``validation_pairs``, ``iterations`` and ``teacher_steps``, its defaults; with ``tune_steps``,
    each ≥ 1 or a UsageError before any work).
    FID from ``num_images`` samples of seed ``seed + 1000``, noise neither tuning nor its validation used."""
    from fmconvert.evaluation.agreement import field_vs_field, field_vs_source, load_points, trajectory_agreement
    from fmconvert.evaluation.fid import fid_between, make_extractor, plot_sweep, reference_stats, sweep
    from fmconvert.files.atomic import atomic_folder, atomic_write
    from fmconvert.integration.folder import write_converted
    from fmconvert.integration.source import inspect_source
    from fmconvert.math.grids import trained_log_snr_range
    from fmconvert.sampling import distributed
    from fmconvert.sampling.generate import generate_run
    from fmconvert.sampling.model import load_velocity_model, sample_shape
    from fmconvert.sampling.runs import OdeSampler, Run, model_fingerprint, sweep_runs

    started = time.perf_counter()
    stages = ["convert", "samples", "agreement", "two models", "FID sweep", "samplers"]
    from fmconvert.errors import UsageError

    if not set(tune_steps) <= set(sampler_steps):
        raise UsageError(f"tune_steps={','.join(map(str, tune_steps))}: tuned samplers are compared at sampler_steps "
                         f"({','.join(map(str, sampler_steps))}); tune at some of those")
    from fmconvert.sampling.baselines import parse_baseline
    from fmconvert.sampling.tuned import check_tuning

    for spec in peers:  # (refused before any work, as the tuning request below)
        parse_baseline(spec)
    tuning = {"pairs": tune_pairs, "validation_pairs": tune_validation_pairs, "iterations": tune_iterations,
              "teacher_steps": tune_teacher_steps}
    if tune_steps:
        if tune_iterations < 1:
            raise UsageError(f"tune_iterations must be positive, got {tune_iterations}")
        check_tuning(TUNE_SOLVER, list(tune_steps), TUNE_METHODS, tune_pairs, tune_validation_pairs, 0, 1,
                     tune_teacher_steps, 64, TUNE_OBJECTIVE)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(stages), desc="report", unit="stage", file=sys.stderr)

    def stage(name):
        log(f"report: {name}")
        if bar is not None:
            bar.set_postfix_str(name)

    def done():
        if bar is not None:
            bar.update(1)

    numbers: dict = {"model": model, "other": other, "fmconvert": __version__, "torch": torch.__version__,
                     "machine": distributed.machine(), "device": device}
    with atomic_folder(Path(out), force) as tmp:
        stage("convert")
        source = inspect_source(model)
        write_converted(source, tmp / "converted")
        lam_max, lam_min = trained_log_snr_range(source.path)
        numbers["loaded"] = {**source.describe(), "trained_log_snr_range": [lam_min, lam_max]}
        done()

        stage("samples")
        converted = load_velocity_model(str(tmp / "converted"), device=device)
        original = load_velocity_model(source, device=device)
        base = Run(model=model, fingerprint=model_fingerprint(source), sampler=OdeSampler("euler"), steps=50, seed=seed,
                   num_images=64, shard_size=64).loaded(source.model_class, sample_shape(original))
        ours_run = dataclasses.replace(base, model=str(tmp / "converted"), sampler=OdeSampler("euler", "trailing"),
                                       fingerprint=model_fingerprint(converted.source),
                                       model_class=converted.source.model_class)
        (ddim_run,) = sweep_runs(base, [], [50], ["ddim"])
        ours, ddim = generate_run(converted, ours_run, device), generate_run(original, ddim_run, device)
        numbers["runs"] = [ours_run.manifest(), ddim_run.manifest()]
        from fmconvert.files.images import save_grid

        save_grid(ours.images, tmp / "converted-euler.png", columns=8)
        save_grid(ddim.images, tmp / "source-ddim.png", columns=8)
        _side_by_side(ours.images, ddim.images, tmp / "samples.png")
        diff = (ours.samples.double() - ddim.samples.double())
        numbers["samples"] = {"num_images": 64, "steps": 50,
                              "relative_l2": (diff.norm() / ddim.samples.double().norm()).item(),
                              "max_abs_error": diff.abs().max().item()}
        done()

        stage("agreement")
        points = load_points(data, 512)
        field = field_vs_source(converted.velocity, points, num_times, ("float32", "bfloat16", "float16"), seed=seed,
                                device=device)
        numbers["field"] = {"data": data, "num_points": len(points), "s": field.s, **field.per_dtype}
        # DDIM along its own listed timesteps: any step count, dividing T or not
        traj_steps = [4, 7, 10, 30, 50]
        numbers["trajectories"], runs = trajectory_agreement(original, base, traj_steps, 64, device=device)
        numbers["runs"] += [run.manifest() for run in runs]
        _plot_agreement(field.s, {d: v["relative_l2"] for d, v in field.per_dtype.items()}, tmp / "agreement.png",
                        "converted field vs the source's PF-ODE drift", "relative L2 error")
        done()

        stage("two models")
        if other is not None:
            second = load_velocity_model(other, device=device)
            pair = field_vs_field(converted.velocity, second.velocity, points, num_times, seed=seed, device=device)
            numbers["two_models"] = {"other": other, "s": pair.s, **pair.per_dtype["float32"]}
            _plot_agreement(pair.s, {"relative L2": pair.per_dtype["float32"]["relative_l2"],
                                     "1 − cosine": [1 - c for c in pair.per_dtype["float32"]["cosine"]]},
                            tmp / "two-models.png", f"{model} (converted) vs {other}", "disagreement")
        done()

        stage("FID sweep")
        extractor = make_extractor("digits", device=device)
        runs = sweep_runs(dataclasses.replace(base, num_images=num_images, shard_size=250), list(solvers), list(steps),
                          ["ddim"])
        result = sweep(original, reference, extractor, runs, device)
        numbers["fid"] = dict(result)
        if reference == "builtin:digits":
            numbers["fid"]["real_train_vs_held_out"] = fid_between(
                reference_stats(f"{reference}/held_out", extractor, device=device).stats,
                reference_stats(f"{reference}/train", extractor, device=device).stats)
        plot_sweep(result, tmp / "fid.png")
        done()

        stage("samplers")
        numbers["samplers"] = compare_samplers(original, base, tmp, reference, extractor, peers, sampler_steps,
                                               tune_steps, num_images, seed + 1000, device, log, tuning=tuning)
        done()

        numbers["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write(tmp / "report.json", lambda p: p.write_text(json.dumps(numbers, indent=2) + "\n"))
        atomic_write(tmp / "report.md", lambda p: p.write_text(render(numbers)))
    if bar is not None:
        bar.close()
    return numbers


def compare_samplers(vm, base, folder: Path, reference: str, extractor, peers: tuple[str, ...],
                     steps: tuple[int, ...], tune_steps: tuple[int, ...], num_images: int, seed: int, device: str,
                     log=print, *, tuning: dict) -> dict:
    """The report's sampler comparison on ``vm`` (the source as it is): FID of the converged solve (rk4, 25
    steps), of ``--solver auto`` and each peer at every NFE of ``steps``, and of a sampler tuned for each
    of ``tune_steps`` (:func:`fmconvert.sampling.tuned.tune` with the settings ``tuning``: pairs,
    validation_pairs, iterations, teacher_steps; written to ``folder/tuned_sampler.json``), all from the
    same noise (``seed``); the
    excess FID of each over the converged solve's, and the ratio of the default's and the tuned sampler's
    excess to the best peer's. ``samplers.png``: FID against NFE."""
    import dataclasses

    from fmconvert.evaluation.fid import plot_sweep, sweep
    from fmconvert.sampling.runs import OdeSampler, model_fingerprint, resolved, sweep_runs, tuned_sampler
    from fmconvert.sampling.tuned import tune

    base = dataclasses.replace(base, seed=seed, num_images=num_images, shard_size=250)
    fingerprint = model_fingerprint(vm.source)
    tuned_file = None
    if tune_steps:
        log(f"report: tuning {TUNE_SOLVER} ({', '.join(TUNE_METHODS)}, objective {TUNE_OBJECTIVE}) "
            f"for NFE {', '.join(map(str, tune_steps))}")
        tuned_file = folder / "tuned_sampler.json"
        tune(vm, fingerprint, list(tune_steps), TUNE_SOLVER, methods=TUNE_METHODS, objective=TUNE_OBJECTIVE,
             device=device, **tuning).save(tuned_file)
    converged = dataclasses.replace(base, sampler=OdeSampler("rk4"), steps=25)
    runs = [converged] + sweep_runs(base, [], list(steps), list(peers))
    runs += [resolved(dataclasses.replace(base, sampler=OdeSampler("auto"), steps=n), vm.source.shifts_times)
             for n in steps]
    if tuned_file is not None:
        runs += [dataclasses.replace(base, sampler=tuned_sampler(str(tuned_file), fingerprint, TUNE_SOLVER, n),
                                     steps=n) for n in tune_steps]
    result = sweep(vm, reference, extractor, runs, device)
    rows = result["rows"]
    floor = rows[0]["fid"]
    kinds = ["converged"] + ["peer"] * len(peers) * len(steps) + ["default"] * len(steps) + ["tuned"] * len(tune_steps)
    for row, kind in zip(rows, kinds):
        row["kind"], row["excess"] = kind, row["fid"] - floor
        row["label"] = {"default": "auto (default)", "tuned": "tuned", "converged": "converged"}.get(kind)
    table = []
    for n in steps:
        at = [r for r in rows if r["nfe"] == n and r["kind"] != "converged"]
        best = min((r for r in at if r["kind"] == "peer"), key=lambda r: r["fid"], default=None)
        entry: dict = {"nfe": n, "best_peer": best and best["sampler"], "best_peer_fid": best and best["fid"]}
        for kind in ("default", "tuned"):
            mine = next((r for r in at if r["kind"] == kind), None)
            if mine is not None:
                entry[f"{kind}_fid"] = mine["fid"]
                entry[f"{kind}_sampler"] = mine["sampler"] + (f" on the {mine['grid']} grid" if kind == "default" else "") \
                    + (f", shift {mine['shift']:g}" if kind == "default" and mine["shift"] is not None else "")
                if best is not None and best["excess"] > 0:
                    entry[f"{kind}_ratio"] = mine["excess"] / best["excess"]
        table.append(entry)
    plot_sweep({**result, "rows": rows[1:]}, folder / "samplers.png")
    return {**result, "converged_fid": floor, "table": table, "peers": list(peers),
            "tuned_file": tuned_file and tuned_file.name,
            "tuning": {"solver": TUNE_SOLVER, "methods": list(TUNE_METHODS), "objective": TUNE_OBJECTIVE, **tuning}}


def render(n: dict) -> str:
    """report.md from the numbers."""
    field = n["field"]
    lines = [
        f"# fmconvert report: {n['model']}",
        "",
        f"fmconvert {n['fmconvert']}, torch {n['torch']}, {n['machine']}, device {n['device']}; {n['seconds']} s.",
        f"Source: {n['loaded']['model_class']} ({n['loaded']['prediction_type']}, {n['loaded']['scheduler']}), "
        f"trained log-SNR range {n['loaded']['trained_log_snr_range'][0]:.2f} … {n['loaded']['trained_log_snr_range'][1]:.2f}.",
        "",
        "## Samples",
        "",
        f"Left: the converted velocity model, Euler on the DDIM grid (trailing), {n['samples']['steps']} steps. "
        f"Right: the source with its own DDIMScheduler, same seeds. Relative L2 difference of the "
        f"{n['samples']['num_images']} samples: {n['samples']['relative_l2']:.2e} "
        f"(largest |difference| {n['samples']['max_abs_error']:.2e}).",
        "",
        "![samples](samples.png)",
        "",
        "## The converted field against the source's PF-ODE drift",
        "",
        f"{field['num_points']} points from the forward process of {field['data']} at each of {len(field['s'])} times; "
        "the drift is computed from the source's native output in score form, independently of the adapter.",
        "",
        _table(["s"] + [f"rel. L2 {d}" for d in ("float32", "bfloat16", "float16")] + ["cosine float32", "largest abs. error float32"],
               [[f"{s:.4f}"] + [f"{field[d]['relative_l2'][i]:.2e}" for d in ("float32", "bfloat16", "float16")]
                + [f"{field['float32']['cosine'][i]:.10f}", f"{field['float32']['max_abs_error'][i]:.2e}"]
                for i, s in enumerate(field["s"])]),
        "",
        "![agreement](agreement.png)",
        "",
        "Trajectories: fmconvert's Euler on the trailing grid against DDIM on the source stepping along the same "
        "listed trailing timesteps (x' = α'·x̂0 + σ'·ε̂ from each to the next), at the same NFE and seeds (64 samples). "
        "diffusers' DDIMScheduler.step steps to t − ⌊1000/N⌋ instead, which for N not dividing 1,000 is not the "
        "timestep it evaluates next: not one ODE solver on one grid, so it is not the reference.",
        "",
        _table(["NFE", "relative L2", "largest abs. difference"],
               [[r["nfe"], f"{r['relative_l2']:.2e}", f"{r['max_abs_error']:.2e}"] for r in n["trajectories"]]),
        "",
    ]
    if "two_models" in n:
        pair = n["two_models"]
        lines += [
            f"## Two independently trained fields: {n['model']} (converted) vs {pair['other']}",
            "",
            "The seed claim on trained networks: same data, same network size and budget, one trained for ε on a "
            "DDPM schedule, one as rectified flow. Both fields on the rectified path at the same points:",
            "",
            _table(["s", "relative L2", "cosine"],
                   [[f"{s:.4f}", f"{pair['relative_l2'][i]:.3f}", f"{pair['cosine'][i]:.4f}"] for i, s in enumerate(pair["s"])]),
            "",
            "![two models](two-models.png)",
            "",
        ]
    fid = n["fid"]
    lines += [
        f"## FID against {fid['reference']} ({fid['features']} features, {fid['num_images']} samples)",
        "",
        (f"Real train split against held-out split (the floor, for scale): {fid['real_train_vs_held_out']:.3f}. "
         if "real_train_vs_held_out" in fid else "") + f"Reference statistics: {fid['reference_stats']['source']}.",
        "",
        _table(["sampler", "steps", "NFE", "FID vs reference", "KID vs reference", "FID vs DDIM baseline"],
               [[r["sampler"] + (" (baseline)" if r["baseline"] else ""), r["steps"], r["nfe"], f"{r['fid']:.3f}",
                 f"{r['kid']:.4f}" if "kid" in r else "", f"{r['fid_vs_baseline']:.3f}" if "fid_vs_baseline" in r else ""]
                for r in fid["rows"]]),
        "",
        "![fid](fid.png)",
        "",
    ]
    if "samplers" in n:
        s = n["samplers"]
        t = s["tuning"]
        settings = (f"; {t['pairs']} pairs, {t['iterations']} iterations, teacher rk4 in {t['teacher_steps']} steps"
                    if "pairs" in t else "")
        tuned = (f"the tuned sampler ({t['solver']}, {', '.join(t['methods'])}, objective {t['objective']}{settings}: "
                 f"[{s['tuned_file']}]({s['tuned_file']}), the grid file sample and fid take)"
                 if s["tuned_file"] else "no tuned sampler")
        lines += [
            "## Samplers at few steps, against diffusers' schedulers",
            "",
            f"The default sampler (solver auto) and {tuned} on the converted field, against diffusers' "
            f"{', '.join(s['peers'])} driving the unconverted network, from the same {s['num_images']} noises "
            f"(seed {s['seed']}, which tuning did not use). Excess = FID − the converged solve's "
            f"({s['converged_fid']:.3f}: rk4, 100 NFE); ratio = excess ÷ the best peer's (below 1: better).",
            "",
            _table(["NFE", "best peer", "its FID", "default", "its FID", "ratio", "tuned FID", "ratio"],
                   [[e["nfe"], e["best_peer"] or "", _number(e["best_peer_fid"]), e.get("default_sampler", ""),
                     _number(e.get("default_fid")), _number(e.get("default_ratio")), _number(e.get("tuned_fid")),
                     _number(e.get("tuned_ratio"))] for e in s["table"]]),
            "",
            "![samplers](samplers.png)",
            "",
        ]
    return "\n".join(lines)


def _number(value) -> str:
    return "" if value is None else f"{value:.3f}"
