#!/usr/bin/env python
"""The tuned sampler ``--grid FILE`` takes after ``fmconvert judge``, against the best peer, on the zoo.

    python scripts/judged_choice.py [--models digits-eps,digits-v,digits-flow]
                                    [--tuned docs/benchmarks/TUNING.json,...] [--peers docs/benchmarks/PEERS-10k.json]
                                    [--num-images 10000] [--keep-files DIR] [--out docs/benchmarks/JUDGED.md]
                                    [--rewrite OUT.json] [--reuse EARLIER.json]

For each zoo model, every LD3 and S4S sampler of the ``--tuned`` files (scripts/tune_bench.py's rows, tuned on
seeds 0 and 1) whose FID from 10,000 samples of seed 1000 the ``--peers`` record holds (scripts/peers_bench.py's)
goes into one tuned sampler file: the file of a user who tuned them all. ``fmconvert judge``'s library call
(:func:`fmconvert.sampling.tuned.judge_model`) scores each of its grids by FID to builtin:digits of
``--num-images`` samples of seed 1 (held-out noise: neither the tuning pairs' seed 0 nor the evaluation seed
1000), and the file's pick at each NFE (:meth:`TunedFile.best`, what ``--grid FILE`` takes) is compared, by
its FID from 10,000 samples, with the best peer's and with

- the tuning runs' own held-out choice (PEERS-10k's: the least FID to the teacher on 256 validation pairs);
- the best candidate on the evaluation noise itself (an oracle: no rule that does not see that noise can
  beat it).

Ratio = excess FID (over the converged solve's, rk4 at 100 NFE) ÷ the best peer's excess. Writes OUT
(Markdown) and OUT with .json (every score). ``--reuse EARLIER.json``: an earlier run's scores, by model,
NFE and sampler, are taken where its judge was this one (measure, images, seed), not judged again (a judge
is deterministic given its noise: a candidate added to the tuning records costs its own judge alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fmconvert.evaluation.fid import frechet_selection, make_extractor  # noqa: E402
from fmconvert.integration.conditioning import Conditioning  # noqa: E402
from fmconvert.sampling.model import load_velocity_model, sample_shape  # noqa: E402
from fmconvert.sampling.runs import model_fingerprint  # noqa: E402
from fmconvert.sampling.tuned import (  # noqa: E402
    JUDGE_IMAGES,
    TunedFile,
    TunedGrid,
    judge_model,
    judged_as,
    source_coordinates,
    steps_for,
)

sys.path.insert(0, str(Path(__file__).parent))
from judge_bench import TUNED  # noqa: E402  (the tuning benchmarks' records)
from peers_bench import held_out_choice, provenance, tuned_label  # noqa: E402  (the rows' names, PEERS-10k's choice)

REFERENCE, SEED = "builtin:digits", 1
PEER_SIDES = ("diffusers", "k-diffusion", "skrample")


def candidates_file(name: str, vm, tuned: list[dict], fid10k: dict) -> tuple[TunedFile, list[str]]:
    """The tuned sampler file of every candidate of ``name`` (LD3 and S4S rows of the tuning records
    ``tuned`` with a 10,000-sample FID in ``fid10k``), and each grid's label (peers_bench's name);
    ``vm``: the model, loaded."""
    file, labels = TunedFile(f"builtin:{name}", model_fingerprint(vm.source)), []
    for record in tuned:
        for row in record["rows"]:
            label = tuned_label(row, record["settings"])
            if row["model"] != name or row["method"] not in ("ld3", "s4s") or (row["nfe"], label) not in fid10k \
                    or (row["nfe"], label) in {(g.nfe, lab) for g, lab in zip(file.grids, labels)}:
                continue
            timesteps, sigmas = source_coordinates(vm, torch.tensor(row["s"], dtype=torch.float64))
            file.grids.append(TunedGrid(row["solver"], steps_for(row["solver"], row["nfe"]), row["nfe"], row["method"],
                                        tuple(row["s"]), tuple(timesteps), tuple(sigmas), {"rmse": row["tuned_rmse"]},
                                        {**record["settings"], "from": "scripts/tune_bench.py"},
                                        tuple(row["weights"]) if row.get("weights") else None))
            labels.append(label)
    return file, labels


def earlier_scores(record: dict, selection, images: int) -> dict[tuple[str, int, str], float]:
    """(model, NFE, sampler label) → judged score of an earlier run's ``record`` (this script's .json),
    or nothing where its judge was another (measure, images or seed)."""
    if (record["judge"], record["judge_images"], record["judge_seed"]) != (selection.name, images, SEED):
        return {}
    return {(p["model"], p["nfe"], label): score for p in record["points"] for label, score in p["scores"].items()}


def same_grid(g: TunedGrid) -> tuple:
    """What makes two files' grids the same sampler: solver, steps, method, times and weights."""
    return g.solver, g.steps, g.method, g.s, g.weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits-eps,digits-v,digits-flow")
    parser.add_argument("--tuned", default=TUNED)
    parser.add_argument("--peers", type=Path, default=Path("docs/benchmarks/PEERS-10k.json"))
    parser.add_argument("--num-images", type=int, default=JUDGE_IMAGES)
    parser.add_argument("--keep-files", type=Path, default=None,
                        help="write the judged files here; a grid an earlier run's file there holds keeps its scores")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/JUDGED.md"))
    parser.add_argument("--rewrite", type=Path, default=None, help="only rewrite OUT from this run's .json")
    parser.add_argument("--reuse", type=Path, default=None, help="an earlier run's .json: its scores are taken (above)")
    args = parser.parse_args()
    if args.rewrite is not None:
        write(json.loads(args.rewrite.read_text()), args.out)
        return
    peers = json.loads(args.peers.read_text())
    tuned = [json.loads(Path(f).read_text()) for f in args.tuned.split(",")]
    selection = frechet_selection(make_extractor("digits"), "cpu", REFERENCE)
    reused = earlier_scores(json.loads(args.reuse.read_text()), selection, args.num_images) if args.reuse else {}
    folder = args.keep_files or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    started, points = time.time(), []
    for name in args.models.split(","):
        rows = [r for r in peers["rows"] if r["model"] == name]
        fid10k = {(r["nfe"], r["sampler"]): r["fid"] for r in rows if r["side"] == "fmconvert tuned"}
        vm = load_velocity_model(f"builtin:{name}")
        file, labels = candidates_file(name, vm, tuned, fid10k)
        path = folder / f"{name}.json"
        if path.is_file():  # (an earlier run's judged file in --keep-files: the same grids keep their scores)
            earlier = {same_grid(g): g.validation["judge"] for g in TunedFile.load(path).grids if "judge" in g.validation}
            for g in file.grids:
                if same_grid(g) in earlier:
                    g.validation["judge"] = earlier[same_grid(g)]
        how = judged_as(selection, args.num_images, SEED, Conditioning(), sample_shape(vm))
        for g, label in zip(file.grids, labels):
            if "judge" not in g.validation and (name, g.nfe, label) in reused:
                g.validation["judge"] = {**how, "score": reused[(name, g.nfe, label)]}
        file.save(path)
        record = judge_model(f"builtin:{name}", path, selection, images=args.num_images, seed=SEED,
                             log=lambda message: print(message, flush=True))
        judged = TunedFile.load(path)
        for steps, index in sorted(record["picks"].items(), key=lambda item: int(item[0])):
            nfe = judged.grids[index].nfe
            here = [(g, label) for g, label in zip(judged.grids, labels) if g.nfe == nfe]
            tuned_rows = [r for r in rows if r["nfe"] == nfe and r["side"] == "fmconvert tuned"]
            peer = min((r for r in rows if r["nfe"] == nfe and r["side"] in PEER_SIDES), key=lambda r: r["fid"])
            own = held_out_choice(tuned_rows)
            oracle = min(tuned_rows, key=lambda r: r["fid"])
            points.append({"model": name, "nfe": nfe, "converged": peers["converged"][name],
                           "peer": {"sampler": f"{peer['side']}: {peer['sampler']}", "fid": peer["fid"]},
                           "judged": {"sampler": labels[index], "fid": fid10k[(nfe, labels[index])],
                                      "score": judged.grids[index].validation["judge"]["score"]},
                           "own": None if own is None else {"sampler": own["sampler"], "fid": own["fid"]},
                           "oracle": {"sampler": oracle["sampler"], "fid": oracle["fid"]},
                           "scores": {label: g.validation["judge"]["score"] for g, label in here}})
            print(json.dumps(points[-1]), flush=True)
    record = {"peers": str(args.peers), "num_images": peers["num_images"], "judge_images": args.num_images,
              "judge_seed": SEED, "judge": selection.name, "points": points, **provenance(started)}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    write(record, args.out)


def write(record: dict, out: Path) -> None:
    lines = ["# The tuned sampler `--grid FILE` takes after `fmconvert judge`", "",
             f"Written by `scripts/judged_choice.py` ({record['seconds']} s on {record['machine']}). Per zoo model, every "
             "tuned sampler of the tuning benchmarks (LD3 and S4S, ab2 and UniPC, each objective) in one tuned sampler "
             f"file, judged by `fmconvert judge --reference {REFERENCE}` ({record['judge']}: FID of "
             f"{record['judge_images']:,} samples of held-out seed {record['judge_seed']}); its pick at each NFE, what "
             f"`--grid FILE` then takes, by its FID from {record['num_images']:,} samples of the benchmark's noise "
             f"([{Path(record['peers']).stem}]({Path(record['peers']).stem}.md)), beside the tuning runs' own held-out "
             "choice (FID to the teacher on 256 validation pairs) and the best candidate on the benchmark's noise itself "
             "(an oracle). Ratio = excess FID over the converged solve's ÷ the best peer's excess (targets of issue 28: "
             "0.15 at 3-6 NFE, 0.10 at 4 NFE; where the peer's excess is below 1 FID point, an FID no higher than the "
             "peer's); — where the peer's excess is not positive (compare the FIDs). The judge and the benchmark measure "
             "FID against the same reference, builtin:digits, from other noise: the judge chooses by the measure the "
             "benchmark reports, as a validation set does.", "",
             "| model | NFE | best peer | its FID | judged pick | its FID | ratio | tuning's own choice | ratio | "
             "oracle | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in record["points"]:
        floor, peer = p["converged"], p["peer"]["fid"]

        def ratio(fid, floor=floor, peer=peer):
            return "—" if peer <= floor else f"{(fid - floor) / (peer - floor):.2f}"

        own = p["own"]
        lines.append(f"| {p['model']} | {p['nfe']} | {p['peer']['sampler']} | {peer:.2f} | {p['judged']['sampler']} | "
                     f"{p['judged']['fid']:.2f} | {ratio(p['judged']['fid'])} | "
                     + (f"{own['sampler']} | {ratio(own['fid'])}" if own else "— | —")
                     + f" | {p['oracle']['sampler']} ({p['oracle']['fid']:.2f}) | {ratio(p['oracle']['fid'])} |")
    lines += [f"\nNote: {note}" for note in record.get("notes", [])]  # (added to the .json by hand, with the reason)
    lines += ["", f"Command: `{record['command']}`; every score: [{out.with_suffix('.json').name}]"
              f"({out.with_suffix('.json').name})."]
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
