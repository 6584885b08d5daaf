#!/usr/bin/env python
"""Conversion at the scale of real checkpoints: `fmconvert wrap` against `cp -r`, and loading
the converted network against loading the source's (the "Conversion at scale" section of
docs/benchmarks/BENCHMARKS.md; scripts/bench.py covers speed of sampling and FID).

    python scripts/bench_scale.py [--work DIR] [--repeats 3] [--skip-sdxl] [--out docs/benchmarks/BENCHMARKS.md]

Checkpoints, randomly initialised and written to disk once under --work (float16, as a Hub
repo holds them; written shard by shard with huggingface_hub's save_torch_state_dict):

- a 258M-parameter UNet2DModel in a DDPMPipeline folder, one file;
- an SDXL-size UNet2DConditionModel (stable-diffusion-xl-base-1.0's UNet config, 2.6B
  parameters) in a StableDiffusionXLPipeline folder (the UNet and scheduler only), sharded.

Each measurement runs in a fresh child process (peak memory = its ru_maxrss), the two sides
alternating, median over --repeats:

- wrap: time against `cp -r` of the same folder (target: ≤ 2×); peak memory against an empty
  `fmconvert --help` (target: ≤ +300 MB); output bytes against the source's (target: < +100 KB).
  Neither `fmconvert --help` nor `wrap` imports torch or diffusers (together about 0.8 GB and
  5–7 s on this CPU machine): wrap reads JSON configs and links the network's files. The rows
  in parentheses give both measured from the floor of fmconvert's own imports
  (`python -c "import fmconvert.cli, fmconvert.integration.folder"`): what grows with the model;
- load: `VelocityAdapter.from_pretrained(OUT/unet, dtype=float16)` against the source network's
  `from_pretrained(SRC/unet, dtype=float16)`: time and peak memory ratios (target: ≤ 1.05).

Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

PIXEL_UNET = dict(  # a DDPM-style pixel UNet at 64×64, 258M parameters
    _class_name="UNet2DModel", sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=[256, 512, 768, 768],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    _class_name="UNet2DConditionModel", sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SCHEDULERS = {
    "UNet2DModel": {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                    "num_train_timesteps": 1000},
    "UNet2DConditionModel": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                             "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                             "steps_offset": 1, "timestep_spacing": "leading"},
}
PIPELINES = {"UNet2DModel": "DDPMPipeline", "UNet2DConditionModel": "StableDiffusionXLPipeline"}

MAKE = r"""
import json, sys, torch, diffusers
from pathlib import Path
from accelerate import init_empty_weights
from huggingface_hub import save_torch_state_dict
config, folder, shard = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cls = getattr(diffusers, config.pop("_class_name"))
with init_empty_weights():
    model = cls.from_config(config)
generator = torch.Generator().manual_seed(0)
state = {k: (torch.randn(v.shape, generator=generator) * 0.02).to(torch.float16) for k, v in model.state_dict().items()}
(folder / "unet").mkdir(parents=True)
model.save_config(folder / "unet")
save_torch_state_dict(state, folder / "unet", filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                      max_shard_size=shard, safe_serialization=True)
print(sum(v.numel() for v in state.values()))
"""

MEASURE = r"""
import resource, runpy, sys, time
started = time.perf_counter()
sys.argv = sys.argv[1:]
try:
    if sys.argv[0] == "-c":
        exec(sys.argv[1])
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as exit:
    if exit.code not in (0, None):
        raise
print("MEASURED", time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

LOAD = "import torch, {module}; {cls}.from_pretrained(r'{path}', dtype=torch.float16)"
#: what `fmconvert wrap` imports before it reads a file (torch, diffusers): the floor of its time and memory
IMPORTS = "import fmconvert.cli, fmconvert.integration.folder"


def measured(*args: str) -> tuple[float, float]:
    """(seconds, peak bytes) of a fresh python process running ``args`` (a module and its
    arguments, or -c CODE)."""
    out = subprocess.run([PYTHON, "-c", MEASURE, *args], capture_output=True, text=True, env={**os.environ,
                         "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip().splitlines()[-1:]}")
    seconds, peak = re.findall(r"MEASURED (\S+) (\S+)", out.stdout)[-1]
    return float(seconds), float(peak)


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def make(work: Path, name: str, config: dict, shard: str) -> tuple[Path, int]:
    folder = work / name
    marker = folder / "parameters.txt"
    if marker.is_file():
        return folder, int(marker.read_text())
    drop(folder)
    out = subprocess.run([PYTHON, "-c", MAKE, json.dumps(config), str(folder), shard], capture_output=True, text=True,
                         check=True)
    kind = config["_class_name"]
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULERS[kind]))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": PIPELINES[kind], "unet": ["diffusers", kind],
        "scheduler": ["diffusers", SCHEDULERS[kind]["_class_name"]]}))
    count = int(out.stdout.split()[-1])
    marker.write_text(str(count))
    return folder, count


def bench(work: Path, name: str, config: dict, shard: str, repeats: int) -> dict:
    src, params = make(work, name, config, shard)
    source_bytes = folder_bytes(src) - (src / "parameters.txt").stat().st_size
    out, copy = work / f"{name}-wrapped", work / f"{name}-copy"
    wrap_s, wrap_peak, copy_s, help_peak, floor_s, floor_peak = [], [], [], [], [], []
    for _ in range(repeats):
        drop(out)
        drop(copy)
        copy_s.append(timed(["cp", "-r", str(src), str(copy)]))
        seconds, peak = measured("fmconvert", "wrap", str(src), "--out", str(out))
        wrap_s.append(seconds)
        wrap_peak.append(peak)
        help_peak.append(measured("fmconvert", "--help")[1])
        seconds, peak = measured("-c", IMPORTS)
        floor_s.append(seconds)
        floor_peak.append(peak)
    drop(copy)
    out_bytes = folder_bytes(out)
    shards = len(list((out / "unet" / "network").glob("*.safetensors")))
    load_src, load_out = [], []
    kind = config["_class_name"]
    for _ in range(repeats):
        load_src.append(measured("-c", LOAD.format(module="diffusers", cls=f"diffusers.{kind}", path=src / "unet")))
        load_out.append(measured("-c", LOAD.format(module="fmconvert.integration.adapters", cls="fmconvert.integration.adapters.VelocityAdapter",
                                                   path=out / "unet")))
    med = statistics.median
    return {
        "name": name, "parameters": params, "source_bytes": source_bytes, "shards": shards,
        "wrap_s": med(wrap_s), "copy_s": med(copy_s), "wrap_peak": med(wrap_peak), "help_peak": med(help_peak),
        "floor_s": med(floor_s), "floor_peak": med(floor_peak),
        "extra_bytes": out_bytes - source_bytes,
        "load_src_s": med(s for s, _ in load_src), "load_out_s": med(s for s, _ in load_out),
        "load_src_peak": med(p for _, p in load_src), "load_out_peak": med(p for _, p in load_out),
    }


def rows(result: dict) -> tuple[list[str], bool]:
    r = result
    checks = [
        (f"wrap time / cp -r time ({r['wrap_s']:.2f} s / {r['copy_s']:.2f} s)", r["wrap_s"] / r["copy_s"], "≤ 2",
         r["wrap_s"] <= 2 * r["copy_s"]),
        (f"wrap peak memory − `fmconvert --help` ({r['wrap_peak'] / 2**20:.0f} MB − {r['help_peak'] / 2**20:.0f} MB)",
         (r["wrap_peak"] - r["help_peak"]) / 2**20, "≤ 300 MB", r["wrap_peak"] - r["help_peak"] <= 300 * 2**20),
        (f"wrap time − its imports ({r['wrap_s']:.2f} s − {r['floor_s']:.2f} s), / cp -r time",
         (r["wrap_s"] - r["floor_s"]) / r["copy_s"], "(≤ 2)", r["wrap_s"] - r["floor_s"] <= 2 * r["copy_s"]),
        (f"wrap peak memory − its imports' ({r['wrap_peak'] / 2**20:.0f} MB − {r['floor_peak'] / 2**20:.0f} MB)",
         (r["wrap_peak"] - r["floor_peak"]) / 2**20, "(≤ 300 MB)", r["wrap_peak"] - r["floor_peak"] <= 300 * 2**20),
        ("output bytes − source bytes", r["extra_bytes"], "< 100 KB", r["extra_bytes"] < 100_000),
        (f"load time, converted / source ({r['load_out_s']:.2f} s / {r['load_src_s']:.2f} s)",
         r["load_out_s"] / r["load_src_s"], "≤ 1.05", r["load_out_s"] <= 1.05 * r["load_src_s"]),
        (f"load peak memory, converted / source ({r['load_out_peak'] / 2**20:.0f} MB / "
         f"{r['load_src_peak'] / 2**20:.0f} MB)", r["load_out_peak"] / r["load_src_peak"], "≤ 1.05",
         r["load_out_peak"] <= 1.05 * r["load_src_peak"]),
    ]
    head = (f"**{r['name']}**: {r['parameters'] / 1e6:.0f}M parameters, float16, {r['source_bytes'] / 2**20:.0f} MiB "
            f"in {r['shards']} file(s)")
    lines = [head, "", "| measure | value | target | |", "|---|---|---|---|"]
    lines += [f"| {what} | {value:.3g} | {target} | {('met' if ok else 'MISSED') if not target.startswith('(') else ('yes' if ok else 'no')} |"
              for what, value, target, ok in checks]
    return lines + [""], all(ok for what, value, target, ok in checks if not target.startswith("("))


def write_section(out: Path, text: str) -> None:
    begin, end = "<!-- bench_scale: begin -->", "<!-- bench_scale: end -->"
    body = f"{begin}\n{text}\n{end}"
    current = out.read_text() if out.is_file() else ""
    if begin in current:
        current = current[:current.index(begin)] + body + current[current.index(end) + len(end):]
    else:
        current = current.rstrip() + "\n\n" + body + "\n"
    out.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoints are written (kept for reruns)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sdxl", action="store_true", help="only the 250M UNet (the SDXL one needs ~11 GB disk)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "docs/benchmarks/BENCHMARKS.md")
    args = parser.parse_args()
    work = args.work or Path(tempfile.gettempdir()) / "fmconvert-bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    cases = [("pixel-unet", PIXEL_UNET, "10GB")]
    if not args.skip_sdxl:
        cases.append(("sdxl-unet", SDXL_UNET, "2GB"))
    lines = ["## Conversion at scale", "",
             f"`python scripts/bench_scale.py --repeats {args.repeats}` ({time.strftime('%Y-%m-%d')}, CPU, medians of "
             f"{args.repeats} fresh processes a side). `wrap` reads configs and hard-links the network's files; the "
             "load rows compare `VelocityAdapter.from_pretrained` with the network's own `from_pretrained`, "
             "float16.", ""]
    all_met = True
    for name, config, shard in cases:
        result = bench(work, name, config, shard, args.repeats)
        table, met = rows(result)
        lines += table
        all_met &= met
        print("\n".join(table), flush=True)
    write_section(args.out, "\n".join(lines))
    sys.exit(0 if all_met else 1)


if __name__ == "__main__":
    main()
