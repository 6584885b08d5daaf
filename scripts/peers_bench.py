#!/usr/bin/env python
"""Few-step samplers side by side: fmconvert (untuned and tuned) against its peers on the zoo.

    python scripts/peers_bench.py [--models digits-eps,...] [--nfe 2,3,4,5,6,8] [--num-images 2000]
                                  [--tuned docs/benchmarks/TUNING.json,...] [--k-diffusion DIR]
                                  [--skrample PYTHON] [--out docs/benchmarks/PEERS.md] [--rewrite OUT.json]
                                  [--reuse EARLIER.json]

For each zoo model and NFE, FID in digits features against builtin:digits of ``--num-images``
samples from the same noise (seed 1000: image n's noise is the n-th of the documented stream) for

- fmconvert: ``--solver auto`` (its measured default) and every tuned sampler the ``--tuned`` files
  (scripts/tune_bench.py's) have for this NFE, LD3 and S4S, with each file's objective (tuned on seeds
  0 and 1, never on this noise); of those whose rows carry a held-out score (tuning chose them by FID to
  the teacher on the validation pairs), the one of least score is the "held-out choice", what
  ``--grid FILE`` takes from a tuned sampler file that holds them all;
- diffusers: DPMSolverMultistepScheduler (2M) and UniPCMultistepScheduler driving the unconverted
  network (fmconvert's ``--baseline dpm++2m`` and ``unipc``; a flow model gets their flow mode),
  and DPM-Solver++ 2M with Karras sigmas;
- k-diffusion (Crowson's, the samplers ComfyUI and A1111 build on): DPM-Solver++ 2M with Karras
  and with exponential sigmas and LMS with Karras sigmas, over the trained σ range, through its own
  DDPM wrappers (``DiscreteEpsDDPMDenoiser`` for digits-eps, ``DiscreteVDDPMDenoiser`` for
  digits-v, unquantised); digits-flow, which k-diffusion has no wrapper for, through the
  denoiser D(x, σ) = x̂0 of fmconvert's field at s = σ/(1 + σ). Installing k-diffusion pulls in
  its training stack (wandb, clip, and an older numpy), so this script loads only its sampling
  and external modules: ``pip install --no-deps --target DIR k-diffusion torchsde trampoline``
  and pass ``--k-diffusion DIR`` (rows are left out without it);
- the converged solve (rk4, 25 steps, 100 NFE), whose FID the excess is measured from.

- skrample (a composable sampler library; Python >= 3.12, its core numpy alone): UniPC of order 2 and 3,
  DPM-Solver of order 2 and 3 and Adams (iPNDM's recursion) of order 3 and 4, each on skrample's own
  schedule for the model (digits-eps: its continuous linear-beta schedule, also with Karras and exponential
  sigmas; digits-v: the cosine schedule's diffusers (timestep, σ/α) pairs as skrample's FixedSchedule, which
  skrample has no beta class for; digits-flow: its linear flow schedule), run by ``--skrample PYTHON``, an
  interpreter with skrample installed, through scripts/skrample_peer.py, which asks this process for
  each network call (rows are left out without it);
Writes OUT (Markdown: the excess ratio of fmconvert's best to the best peer's per point) and the
numbers beside it (.json). ``--reuse EARLIER.json``: the rows of an earlier run of the same sample count
and seed are taken, not run again (every sampler here is deterministic given the noise), and the record
says how many.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fmconvert  # noqa: E402
from fmconvert.evaluation.fid import make_extractor, reference_stats, stats_of, sweep  # noqa: E402
from fmconvert.evaluation.statistics import fid_between  # noqa: E402
from fmconvert.files.images import to_uint8  # noqa: E402
from fmconvert.math.solvers import resolve_auto  # noqa: E402
from fmconvert.sampling import distributed  # noqa: E402
from fmconvert.sampling.baselines import parse_baseline  # noqa: E402
from fmconvert.sampling.generate import velocity_field  # noqa: E402
from fmconvert.sampling.model import load_velocity_model, sample_shape  # noqa: E402
from fmconvert.sampling.noise import NoiseStream  # noqa: E402
from fmconvert.sampling.runs import TUNED, OdeSampler, Run, SchedulerSampler, model_fingerprint  # noqa: E402

SEED, REFERENCE, BATCH = 1000, "builtin:digits", 500
DIFFUSERS = ("dpm++2m", "unipc", "dpm++2m:use_karras_sigmas=true")
K_SAMPLERS = (("dpmpp_2m", "karras"), ("dpmpp_2m", "exponential"), ("lms", "karras"))


def load_k_diffusion(folder: Path):
    """k_diffusion.sampling and .external from ``folder`` without its package __init__ (which
    imports the training stack)."""
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder / "k_diffusion")]
    sys.modules["k_diffusion"] = package
    sys.path.insert(0, str(folder))
    modules = {}
    for name in ("utils", "sampling", "external"):
        spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", folder / "k_diffusion" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"k_diffusion.{name}"] = module
        spec.loader.exec_module(module)
        setattr(package, name, module)
        modules[name] = module
    return modules["sampling"], modules["external"]


class _Eps(torch.nn.Module):
    """The unconverted UNet as k-diffusion's inner model: (x, t) → its output."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


class _FlowDenoiser(torch.nn.Module):
    """D(x, σ) for a velocity field u(x_s, s): s = σ/(1 + σ), x_s = x/(1 + σ), x̂0 = x_s − s·u."""

    def __init__(self, field, sigma_min: float, sigma_max: float):
        super().__init__()
        self.field, self.sigma_min, self.sigma_max = field, sigma_min, sigma_max

    def forward(self, x, sigma):
        s = (sigma / (1 + sigma)).to(torch.float64)
        x_s = x / (1 + sigma).view(-1, *[1] * (x.ndim - 1))
        u = self.field(x_s, s)
        return x_s - s.view(-1, *[1] * (x.ndim - 1)).to(x.dtype) * u


def k_rows(name, vm, k_sampling, k_external, nfe_list, num_images, extractor, ref, samplers=K_SAMPLERS, done=None):
    """FID of k-diffusion's samplers on ``vm``'s source at each NFE, from the documented noise (``done``: rows
    of an earlier run, by (model, NFE, side, sampler), taken instead of running them again)."""
    from diffusers import DDPMScheduler

    source = vm.source
    if source.prediction_type in ("epsilon", "v_prediction"):
        alphas = DDPMScheduler.from_config(source.scheduler).alphas_cumprod
        wrapper = k_external.DiscreteEpsDDPMDenoiser if source.prediction_type == "epsilon" else k_external.DiscreteVDDPMDenoiser
        from fmconvert.integration.source import load_denoiser

        model = wrapper(_Eps(load_denoiser(source).eval()), alphas, quantize=False)
        sigma_min, sigma_max = float(model.sigma_min), float(model.sigma_max)
    else:  # a flow model: k-diffusion has no wrapper; fmconvert's field as a denoiser over s in [1/T, 1 − 1/T]
        sigma_min, sigma_max = 1 / 999, 999.0
        model = None
    shape = sample_shape(vm)
    rows = []
    for sampler, schedule in samplers:
        for nfe in nfe_list:
            key = (name, nfe, "k-diffusion", f"{sampler} ({schedule} sigmas)")
            if key in (done or {}):
                rows.append(done[key])
                continue
            if schedule == "karras":
                sigmas = k_sampling.get_sigmas_karras(nfe, sigma_min, sigma_max, rho=7.0)
            else:
                sigmas = k_sampling.get_sigmas_exponential(nfe, sigma_min, sigma_max)
            batches = []
            for start in range(0, num_images, BATCH):
                count = min(BATCH, num_images - start)
                noise = NoiseStream(num_images, shape, SEED).take(start, start + count)
                denoiser = model or _FlowDenoiser(velocity_field(vm, None, start, count, "cpu"), sigma_min, sigma_max)
                with torch.no_grad():
                    x0 = getattr(k_sampling, f"sample_{sampler}")(denoiser, noise * sigmas[0], sigmas, disable=True)
                batches.append(to_uint8((x0 / 2 + 0.5).clamp(0, 1)))
            fid = fid_between(ref.stats, stats_of(batches, extractor))
            rows.append({"model": name, "nfe": nfe, "side": "k-diffusion", "sampler": f"{sampler} ({schedule} sigmas)",
                         "fid": fid})
            print(json.dumps(rows[-1]), flush=True)
    return rows


SKRAMPLE_SAMPLERS = (("UniPC", 2), ("UniPC", 3), ("DPM", 2), ("DPM", 3), ("Adams", 3), ("Adams", 4))


def skrample_jobs(vm, sigmas: tuple[str, ...] = ("none", "karras", "exponential")) -> list[dict]:
    """skrample's schedules for ``vm``'s source (see the module docstring), as scripts/skrample_peer.py's jobs."""
    config = vm.source.scheduler
    if vm.source.prediction_type == "flow_prediction":
        return [{"model": "flow", "schedule": "linear", "base_timesteps": config["num_train_timesteps"],
                 "shift": config.get("shift", 1.0), "subschedule": None}]
    model = vm.source.prediction_type
    if config["beta_schedule"] in ("linear", "scaled_linear"):
        base = {"model": model, "schedule": "scaled", "beta_start": config["beta_start"], "beta_end": config["beta_end"],
                "beta_scale": 1 if config["beta_schedule"] == "linear" else 2,
                "base_timesteps": config["num_train_timesteps"]}
        return [{**base, "subschedule": None if sub == "none" else sub} for sub in sigmas]
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_config(config).alphas_cumprod.double()
    timesteps = torch.arange(len(alphas) - 1, -1, -1)
    points = torch.stack([timesteps.double(), ((1 - alphas[timesteps]) / alphas[timesteps]).sqrt()], 1)
    return [{"model": model, "schedule": "fixed", "points": points.tolist(), "subschedule": None}]


def skrample_rows(name, vm, python, nfe_list, num_images, extractor, ref, samplers=SKRAMPLE_SAMPLERS,
                  sigmas=("none", "karras", "exponential"), done=None, seed=SEED):
    """FID of skrample's samplers on ``vm``'s unconverted network at each NFE, from the documented noise of
    ``seed``: the sampling runs in ``python`` (scripts/skrample_peer.py), each network call here (``done``: as
    k_rows)."""
    import subprocess

    from fmconvert.integration.source import load_denoiser

    sys.path.insert(0, str(Path(__file__).parent))
    from skrample_peer import receive, send  # (the protocol; the worker's numpy and json only)

    unet = load_denoiser(vm.source).eval()
    shape = sample_shape(vm)
    noise = NoiseStream(num_images, shape, seed).take(0, num_images).double().numpy()
    worker = subprocess.Popen([str(python), str(Path(__file__).with_name("skrample_peer.py"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    rows = []
    try:
        for job in skrample_jobs(vm, sigmas):
            for sampler, order in samplers:
                for nfe in nfe_list:
                    schedule = job["schedule"] + (f", {job['subschedule']} sigmas" if job["subschedule"] else "")
                    key = (name, nfe, "skrample", f"{sampler} order {order} ({schedule})")
                    if key in (done or {}):
                        rows.append(done[key])
                        continue
                    worker.stdin.write((json.dumps({**job, "sampler": sampler, "order": order, "steps": nfe}) + "\n").encode())
                    send(worker.stdin, noise)
                    calls = 0
                    while (line := worker.stdout.readline().decode().split()) and line[0] == "call":
                        x = torch.from_numpy(receive(worker.stdout).copy()).float()
                        t = torch.full((x.shape[0],), float(line[1]))
                        with torch.no_grad():
                            out = torch.cat([unet(x[i:i + BATCH], t[i:i + BATCH]).sample for i in range(0, len(x), BATCH)])
                        send(worker.stdin, out.double().numpy())
                        calls += 1
                    if not line:
                        raise RuntimeError(f"skrample's worker stopped ({worker.wait()})")
                    x0 = torch.from_numpy(receive(worker.stdout).copy()).float()
                    images = [to_uint8((x0[i:i + BATCH] / 2 + 0.5).clamp(0, 1)) for i in range(0, len(x0), BATCH)]
                    fid = fid_between(ref.stats, stats_of(images, extractor))
                    rows.append({"model": name, "nfe": calls, "side": "skrample",
                                 "sampler": f"{sampler} order {order} ({schedule})", "fid": fid})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        worker.stdin.close()
        worker.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits-eps,digits-v,digits-flow")
    parser.add_argument("--nfe", default="2,3,4,5,6,8")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--tuned", default="docs/benchmarks/TUNING.json,docs/benchmarks/TUNING-features.json,"
                        "docs/benchmarks/TUNING-features-fid.json",
                        help="scripts/tune_bench.py's numbers, comma-separated: their LD3 and S4S samplers are the tuned rows")
    parser.add_argument("--k-diffusion", type=Path, default=None, help="a folder holding k_diffusion (see above)")
    parser.add_argument("--skrample", type=Path, default=None, help="a Python >= 3.12 with skrample (see above)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/PEERS.md"))
    parser.add_argument("--diffusers", default=";".join(DIFFUSERS), help="diffusers' schedulers as --baseline takes them, separated by ;")
    parser.add_argument("--k-samplers", default=",".join(f"{a}:{b}" for a, b in K_SAMPLERS),
                        help="k-diffusion's SAMPLER:SIGMAS pairs")
    parser.add_argument("--skrample-samplers", default=",".join(f"{a}:{b}" for a, b in SKRAMPLE_SAMPLERS),
                        help="skrample's CLASS:ORDER pairs")
    parser.add_argument("--skrample-sigmas", default="none,karras,exponential",
                        help="skrample's sigma schedules on a beta schedule (none: its own)")
    parser.add_argument("--rewrite", type=Path, default=None, help="only rewrite OUT from this run's .json")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="an earlier run's .json of the same --num-images: its rows (and converged FIDs) are taken, "
                             "not run again; every sampler here is deterministic given the noise")
    args = parser.parse_args()
    if args.rewrite is not None:
        write(json.loads(args.rewrite.read_text()), args.out)
        return
    started = time.time()
    nfe_list = [int(n) for n in args.nfe.split(",")]
    tuned = [{**record["settings"], **row}  # (each row with its run's settings: its name, tuned_label, reads them)
             for record in (json.loads(Path(f).read_text()) for f in args.tuned.split(",") if Path(f).is_file())
             for row in record["rows"]]
    k_modules = load_k_diffusion(args.k_diffusion) if args.k_diffusion else None
    extractor = make_extractor("digits")
    ref = reference_stats(REFERENCE, extractor)
    rows: list[dict] = []
    failed: list[dict] = []
    converged: dict[str, float] = {}
    done: dict[tuple, dict] = {}
    scores: dict[tuple, float] = {}  # (model, NFE, tuned sampler): its held-out score, where tuning chose by one
    if args.reuse is not None:
        earlier = json.loads(args.reuse.read_text())
        if (earlier["num_images"], earlier["seed"]) != (args.num_images, SEED):
            raise SystemExit(f"--reuse {args.reuse}: {earlier['num_images']} samples of seed {earlier['seed']}, not "
                             f"{args.num_images} of seed {SEED}")
        done = {(r["model"], r["nfe"], r["side"], r["sampler"]): r for r in earlier["rows"]}
    for name in args.models.split(","):
        model = f"builtin:{name}"
        vm = load_velocity_model(model)
        base = Run(model=model, fingerprint=model_fingerprint(vm.source), sampler=OdeSampler("rk4"), steps=25, seed=SEED,
                   num_images=args.num_images, shard_size=BATCH)
        runs, labels = [base], [("converged", "rk4, 25 steps")]
        for nfe in nfe_list:
            solver, shift = resolve_auto(nfe, "uniform", None, vm.source.shifts_times)
            runs.append(dataclasses.replace(base, sampler=OdeSampler(solver, "uniform", shift), steps=nfe))
            labels.append(("fmconvert", f"auto: {solver}" + (f", shift {shift:g}" if shift else "")))
            for row in tuned:
                if row["model"] == name and row["nfe"] == nfe and row["method"] in ("ld3", "s4s"):
                    runs.append(dataclasses.replace(base, sampler=tuned_sampler(row), steps=nfe))
                    labels.append(("fmconvert tuned", tuned_label(row, row)))
                    if row.get("score") is not None:
                        scores[(name, nfe, labels[-1][1])] = row["score"]
            for spec in args.diffusers.split(";"):
                if vm.source.prediction_type == "flow_prediction" and ":" in spec:
                    continue  # (Karras sigmas: a diffusion schedule's option)
                runs.append(dataclasses.replace(base, sampler=diffusers_sampler(spec), steps=nfe))
                labels.append(("diffusers", spec))
        for run, (side, label) in zip(runs, labels):  # one sweep a run: a scheduler that fails is recorded, not fatal
            if side == "converged" and args.reuse is not None and name in earlier["converged"]:
                converged[name] = earlier["converged"][name]
                continue
            if (name, run.steps, side, label) in done:
                rows.append({**done[(name, run.steps, side, label)]})
                if (name, run.steps, label) in scores:
                    rows[-1]["score"] = scores[(name, run.steps, label)]
                continue
            try:
                (row,) = sweep(vm, REFERENCE, extractor, [run])["rows"]
            except Exception as error:  # noqa: BLE001 (diffusers' schedulers fail on some schedules and step counts)
                failed.append({"model": name, "nfe": run.steps, "side": side, "sampler": label,
                               "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"})
                print(json.dumps(failed[-1]), flush=True)
                continue
            if side == "converged":
                converged[name] = row["fid"]
                continue
            rows.append({"model": name, "nfe": row["nfe"], "side": side, "sampler": label, "fid": row["fid"]})
            if (name, run.steps, label) in scores:
                rows[-1]["score"] = scores[(name, run.steps, label)]
            print(json.dumps(rows[-1]), flush=True)
        if k_modules is not None:
            rows += k_rows(name, vm, *k_modules, nfe_list, args.num_images, extractor, ref,
                           [tuple(pair.split(":")) for pair in args.k_samplers.split(",")], done)
        if args.skrample is not None:
            rows += skrample_rows(name, vm, args.skrample, nfe_list, args.num_images, extractor, ref,
                                  [(c, int(o)) for c, o in (pair.split(":") for pair in args.skrample_samplers.split(","))],
                                  tuple(args.skrample_sigmas.split(",")), done)
    record = {"num_images": args.num_images, "seed": SEED, "converged": converged, "rows": rows, "failed": failed,
              **provenance(started), "k_diffusion": k_modules is not None, "skrample": args.skrample is not None}
    if args.reuse is not None:
        record["reused"] = {"from": str(args.reuse), "rows": sum(1 for r in rows if (r["model"], r["nfe"], r["side"], r["sampler"])
                                                                 in done)}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    write(record, args.out)


def provenance(started: float) -> dict:
    """What a benchmark record says of its run: seconds since ``started`` (time.time()), the versions, the
    machine and the command line."""
    return {"seconds": round(time.time() - started, 1), "fmconvert": fmconvert.__version__, "torch": torch.__version__,
            "machine": distributed.machine(), "command": " ".join(["python"] + sys.argv)}


def tuned_sampler(row: dict) -> OdeSampler:
    """The sampler a scripts/tune_bench.py row names: its solver on its tuned times, with its s4s weights."""
    return OdeSampler(row["solver"], TUNED, times=tuple(row["s"]), weights=tuple(row["weights"]) if row.get("weights") else None)


def diffusers_sampler(spec: str) -> SchedulerSampler:
    """diffusers' scheduler ``spec`` (as ``--baseline`` takes it, e.g. ``dpm++2m:use_karras_sigmas=true``) driving
    the unconverted network."""
    baseline, options = parse_baseline(spec)
    return SchedulerSampler(baseline.name, options, baseline.grid)


def tuned_label(row: dict, settings: dict) -> str:
    """A tuned sampler's name in the rows: its solver and method (``row``, a scripts/tune_bench.py row) and the
    objective and selection it was tuned with (``settings``, that run's; mse and loss where they predate them)."""
    select, objective = settings.get("select", "loss"), settings.get("objective", "mse")
    extras = (["cosine"] if settings.get("lr_schedule") == "cosine" and objective != "frechet" else []) \
        + ([f"{settings['pairs']} pairs"] if settings.get("pairs", 128) != 128 else [])  # (frechet ran cosine alone)
    return (f"{row['solver']}, {row['method']} ({', '.join([objective] + extras)}"
            + ("" if select == "loss" else f", chosen by {select}") + ")")


def held_out_choice(tuned_rows: list[dict]) -> dict | None:
    """The tuned sampler a tuned sampler file holding all of ``tuned_rows`` hands ``--grid FILE``: the one of least
    held-out score (FID to the teacher on the validation pairs, never this noise), among those tuning chose by one
    (TunedFile.best's rule); None where none has a score."""
    scored = [r for r in tuned_rows if r.get("score") is not None]
    return min(scored, key=lambda r: r["score"], default=None)


def write(record: dict, out: Path) -> None:
    """OUT (Markdown) from a run's record (also ``--rewrite OUT.json``)."""
    rows, converged, failed = record["rows"], record["converged"], record["failed"]
    nfe_list = sorted({r["nfe"] for r in rows})
    peer_sides = ("diffusers", "k-diffusion", "skrample")
    lines = ["# fmconvert against its peers at few steps", "",
             f"Written by `scripts/peers_bench.py` ({record['seconds']} s on {record['machine']}). FID in digits features "
             f"against builtin:digits, {record['num_images']} samples from the same noise (seed {record['seed']}) for every "
             "sampler; the NFE is counted from network calls. Peers: " + ", ".join(
                 side for side in peer_sides if any(r["side"] == side for r in rows)) + ". Excess = FID − the converged "
             "solve's (rk4, 100 NFE). Ratio = the excess of fmconvert's default (auto), of the held-out choice (of the "
             "tuned samplers chosen by FID on their validation pairs, the one of least such score, as `--grid FILE` "
             "takes it from a file that holds them all: never this noise) and of its best tuned sampler ÷ the best peer's "
             "(below 1: fmconvert is better; below 0: its FID is below the converged solve's, within the estimate's noise; "
             "— where the peer's excess is not positive: compare the FIDs). The best tuned sampler is the best of the "
             "`--tuned` files' samplers on this very noise, a choice that flatters it.",
             "",
             "| model | NFE | best peer | its FID | fmconvert auto | held-out choice | its FID | best tuned (method, objective) "
             "| its FID | ratio auto | ratio held-out choice | ratio best tuned |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in converged:
        for nfe in nfe_list:
            here = [r for r in rows if r["model"] == name and r["nfe"] == nfe]
            peers = [r for r in here if r["side"] in peer_sides]
            ours = [r for r in here if r["side"].startswith("fmconvert")]
            if not peers or not ours:
                continue
            peer = min(peers, key=lambda r: r["fid"])
            auto = next(r for r in ours if r["side"] == "fmconvert")
            tuned_row = min((r for r in ours if r["side"] == "fmconvert tuned"), key=lambda r: r["fid"], default=None)
            one = held_out_choice([r for r in ours if r["side"] == "fmconvert tuned"])
            floor = converged[name]

            def ratio(row, floor=floor, peer=peer):  # — where the peer's excess is not positive: compare FIDs
                return "—" if row is None or peer["fid"] <= floor else f"{(row['fid'] - floor) / (peer['fid'] - floor):.2f}"

            lines.append(f"| {name} | {nfe} | {peer['side']}: {peer['sampler']} | {peer['fid']:.2f} | {auto['fid']:.2f} | "
                         + (f"{one['sampler']} | {one['fid']:.2f}" if one else "— | —") + " | "
                         + (f"{tuned_row['sampler']} | {tuned_row['fid']:.2f}" if tuned_row else "— | —")
                         + f" | {ratio(auto)} | {ratio(one)} | {ratio(tuned_row)} |")
    lines += ["", "Converged FID: " + ", ".join(f"{k} {v:.2f}" for k, v in converged.items()) + "."]
    lines += ["", "Samplers run: " + "; ".join(
        f"{side}: " + " · ".join(sorted({r['sampler'] for r in rows if r['side'] == side}))
        for side in ("fmconvert", "fmconvert tuned", *peer_sides) if any(r["side"] == side for r in rows)) + "."]
    if record.get("command"):
        lines += ["", f"Command: `{record['command']}`."]
    if record.get("reused"):
        lines += ["", f"{record['reused']['rows']} rows were taken from {record['reused']['from']} (`--reuse`: the same "
                  "samplers on the same noise, run before), the rest run here; the seconds are this run's."]
    lines += [f"\nNote: {note}" for note in record.get("notes", [])]  # (added to the .json by hand, with the reason)
    if failed:
        lines += ["", "Runs that failed (left out of the table): " + "; ".join(
            f"{f['model']} {f['sampler']} at {f['nfe']} NFE ({f['error']})" for f in failed) + "."]
    lines += ["",
              "Every row: " + ("" if record.get("k_diffusion") else "(k-diffusion not loaded) ")
              + ("" if record.get("skrample") else "(skrample not run) ") + f"[{out.with_suffix('.json').name}]"
              f"({out.with_suffix('.json').name})."]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
