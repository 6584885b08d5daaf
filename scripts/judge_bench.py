#!/usr/bin/env python
"""How well a held-out score ranks tuned samplers: each judge's pick against the FID from 10,000 samples.

    python scripts/judge_bench.py [--models digits-v,digits-flow] [--nfe 4,5]
                                  [--tuned docs/benchmarks/TUNING.json,...] [--peers docs/benchmarks/PEERS-10k.json]
                                  [--judges teacher:256,teacher:2048,data:256,data:1024,data:2048]
                                  [--teacher-steps 32] [--out docs/benchmarks/JUDGE.md] [--rewrite OUT.json]

``tune --select fid`` keeps, of a descent's checkpoints and of the untuned start grids, the one of least
held-out score, and ``--grid FILE`` takes, of a file's grids, the one of least score: the "held-out choice"
of docs/benchmarks/PEERS-10k.md. That choice is only as good as the score's ranking. For every tuned
sampler (the LD3 and S4S rows of the ``--tuned`` files, scripts/tune_bench.py's) at each NFE whose FID from
10,000 samples of seed 1000 the ``--peers`` record holds (scripts/peers_bench.py's), this scores it with
each judge on the first N held-out noises of the validation seed 1 (the noise stream is one sequence, so
the smaller sets are the larger's first images):

- ``teacher:N``: what ``--select fid`` computes, FID's Fréchet distance in digits features between the
  sampler's endpoints and the teacher's from the same noise (rk4 on the uniform grid, ``--teacher-steps``
  steps; tuning's own teacher takes 64, the ranking is the same at 32 and costs half);
- ``data:N``: the FID of the sampler's endpoints against builtin:digits, the benchmark's own reference
  (what ``--select fid --reference builtin:digits`` computes: it needs the data, and it is the measure the
  benchmark reports).

and writes, per model, NFE and judge, the pick (least score), its FID from 10,000 samples, the best FID
among the candidates and Kendall's τ between score and FID (1: the judge ranks them as 10,000 samples
do). Writes OUT (Markdown) and OUT with .json (every score). The sampler endpoints and the teacher are
solved once for the largest N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmconvert.evaluation.fid import make_extractor, reference_stats, stats_of  # noqa: E402
from fmconvert.evaluation.statistics import fid_between  # noqa: E402
from fmconvert.files.images import to_uint8  # noqa: E402
from fmconvert.math.solvers import SOLVERS, integrate  # noqa: E402
from fmconvert.sampling.generate import velocity_field  # noqa: E402
from fmconvert.sampling.model import load_velocity_model, sample_shape, sampling_grid  # noqa: E402
from fmconvert.sampling.noise import NoiseStream  # noqa: E402
from fmconvert.sampling.tuned import _start_scale  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from peers_bench import provenance, tuned_label  # noqa: E402  (the rows' names: a sampler is found by its name there)

VALIDATION_SEED, REFERENCE = 1, "builtin:digits"
TUNED = ("docs/benchmarks/TUNING.json,docs/benchmarks/TUNING-features-fid.json,docs/benchmarks/TUNING-unipc.json,"
         "docs/benchmarks/TUNING-frechet.json,docs/benchmarks/TUNING-512-ab2.json,docs/benchmarks/TUNING-512-unipc.json,"
         "docs/benchmarks/TUNING-frechet-512-ab2.json,docs/benchmarks/TUNING-frechet-512-unipc.json")


def kendall(scores: list[float], fids: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(scores, fids).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits-v,digits-flow")
    parser.add_argument("--nfe", default="4,5")
    parser.add_argument("--tuned", default=TUNED)
    parser.add_argument("--peers", type=Path, default=Path("docs/benchmarks/PEERS-10k.json"))
    parser.add_argument("--judges", default="teacher:256,teacher:2048,data:256,data:1024,data:2048")
    parser.add_argument("--teacher-steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/JUDGE.md"))
    parser.add_argument("--rewrite", type=Path, default=None, help="only rewrite OUT from this run's .json")
    args = parser.parse_args()
    if args.rewrite is not None:
        write(json.loads(args.rewrite.read_text()), args.out)
        return
    nfe_list = [int(n) for n in args.nfe.split(",")]
    judges = [(kind, int(count)) for kind, count in (j.split(":") for j in args.judges.split(","))]
    if any(kind not in ("teacher", "data") for kind, _ in judges):
        raise SystemExit(f"--judges {args.judges}: each is teacher:N or data:N")
    largest = max(count for _, count in judges)
    peers = json.loads(args.peers.read_text())
    extractor = make_extractor("digits")
    reference = reference_stats(REFERENCE, extractor).stats
    started, candidates = time.time(), []
    for name in args.models.split(","):
        vm = load_velocity_model(f"builtin:{name}")
        fid10k = {(r["nfe"], r["sampler"]): r["fid"] for r in peers["rows"] if r["model"] == name}
        rows = [(row, tuned_label(row, record["settings"]))
                for record in (json.loads(Path(f).read_text()) for f in args.tuned.split(","))
                for row in record["rows"]
                if row["model"] == name and row["nfe"] in nfe_list and row["method"] in ("ld3", "s4s")]
        rows = [(row, label) for row, label in rows if (row["nfe"], label) in fid10k]
        field = velocity_field(vm, None, 0, largest, "cpu")
        noise = NoiseStream(largest, sample_shape(vm), VALIDATION_SEED).take(0, largest)

        def decode(x: torch.Tensor, vm=vm) -> torch.Tensor:
            return to_uint8(vm.source.family.decode(vm.pipeline, x))

        against = {(kind, count): reference for kind, count in judges if kind == "data"}
        if len(against) < len(judges):  # (the teacher's statistics for each count, once a model)
            grid = sampling_grid(vm, "uniform", args.teacher_steps)
            with torch.no_grad():
                teacher_images = decode(SOLVERS["rk4"].step(field, noise * _start_scale(grid), grid))
            against.update({(kind, count): stats_of([teacher_images[:count]], extractor)
                            for kind, count in judges if kind == "teacher"})
        for row, label in rows:
            grid = torch.tensor(row["s"], dtype=torch.float64)
            weights = torch.tensor(row["weights"], dtype=torch.float64) if row.get("weights") else None
            with torch.no_grad():
                images = decode(integrate(field, noise * _start_scale(grid), grid, row["solver"], weights))
            scores = {f"{kind}:{count}": fid_between(against[(kind, count)], stats_of([images[:count]], extractor))
                      for kind, count in judges}
            candidates.append({"model": name, "nfe": row["nfe"], "sampler": label, "fid": fid10k[(row["nfe"], label)],
                               "scores": scores})
            print(json.dumps(candidates[-1]), flush=True)
    record = {"peers": str(args.peers), "num_images": peers["num_images"], "validation_seed": VALIDATION_SEED,
              "teacher_steps": args.teacher_steps, "judges": [f"{k}:{c}" for k, c in judges], "candidates": candidates,
              **provenance(started)}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    write(record, args.out)


def write(record: dict, out: Path) -> None:
    candidates = record["candidates"]
    lines = ["# How well held-out scores pick tuned samplers", "",
             f"Written by `scripts/judge_bench.py` ({record['seconds']} s on {record['machine']}). Each tuned sampler "
             f"(LD3 and S4S from the tuning benchmarks) is scored by each judge on the first N held-out noises of seed "
             f"{record['validation_seed']}; its FID is from {record['num_images']} samples of the benchmark's noise "
             f"([{Path(record['peers']).stem}]({Path(record['peers']).stem}.md)). teacher:N = FID's Fréchet distance to "
             f"the teacher's endpoints from the same noise (what `tune --select fid` computes; teacher rk4 in "
             f"{record['teacher_steps']} steps); data:N = FID against builtin:digits, the "
             "benchmark's reference (what `tune --select fid --reference builtin:digits` computes). "
             "Pick = the judge's least score; τ = Kendall's rank correlation of score and FID over the candidates.",
             "", "| model | NFE | candidates | best FID | judge | pick | its FID | τ |", "|---|---|---|---|---|---|---|---|"]
    for model, nfe in sorted({(c["model"], c["nfe"]) for c in candidates}):
        here = [c for c in candidates if (c["model"], c["nfe"]) == (model, nfe)]
        best = min(c["fid"] for c in here)
        for judge in record["judges"]:
            pick = min(here, key=lambda c: c["scores"][judge])
            tau = kendall([c["scores"][judge] for c in here], [c["fid"] for c in here])
            lines.append(f"| {model} | {nfe} | {len(here)} | {best:.2f} | {judge} | {pick['sampler']} | {pick['fid']:.2f} "
                         f"| {tau:.2f} |")
    lines += ["", "Every score:", "", "| model | NFE | sampler | FID | " + " | ".join(record["judges"]) + " |",
              "|---|---|---|---|" + "---|" * len(record["judges"])]
    for c in sorted(candidates, key=lambda c: (c["model"], c["nfe"], c["fid"])):
        lines.append(f"| {c['model']} | {c['nfe']} | {c['sampler']} | {c['fid']:.2f} | "
                     + " | ".join(f"{c['scores'][j]:.2f}" for j in record["judges"]) + " |")
    lines += [f"\nNote: {note}" for note in record.get("notes", [])]  # (added to the .json by hand, with the reason)
    lines += ["", f"Command: `{record['command']}`; every number: [{out.with_suffix('.json').name}]"
              f"({out.with_suffix('.json').name})."]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
