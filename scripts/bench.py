#!/usr/bin/env python
"""Side-by-side benchmarks: fmconvert against the bare model, diffusers and torch-fidelity.

    python scripts/bench.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 5] [--quick]
                            [--fid-images 2000] [--out BENCHMARKS.md]

Each comparison alternates the two sides, repeats, and reports medians and their ratio:

1. adapter forward vs the bare UNet forward, same batch (target: ratio <= 1.02);
2. `fmconvert sample --solver euler --steps N` vs diffusers DDIMPipeline, N steps, same
   model and batch (target: ratio <= 1.00 in time);
3. FID of the same images: fmconvert's path vs torch-fidelity's calculate_metrics with the
   same (randomly initialised, saved) Inception weights: throughput ratio >= 1.0, equal
   values, and peak memory at two image counts (it must not grow with the count).

Models: a UNet2DModel with the google/ddpm-cifar10-32 layout (35.7M parameters, random
weights) and builtin:digits-eps. Writes the table, the command and the machine to --out,
and exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cifar_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(a, b, repeats: int, device: str, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of a() and b(), run alternately."""
    for _ in range(warmup):
        a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - started)
    return statistics.median(times_a), statistics.median(times_b)


def bench_forward(model, scheduler, batch: int, device: str, dtype, repeats: int) -> dict:
    from fmconvert import VelocityAdapter

    model = model.to(device, dtype)
    adapter = VelocityAdapter.from_diffusion(model, scheduler).to(device)
    shape = (batch, model.config.in_channels, model.config.sample_size, model.config.sample_size)
    x = torch.randn(shape, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    tau = torch.full((batch,), 500.0, device=device)
    with torch.no_grad():
        bare, ours = alternate(lambda: model(x, t).sample, lambda: adapter(x, tau).sample, repeats, device)
    return {"bare_s": bare, "fmconvert_s": ours, "ratio": ours / bare}


def bench_sampling(folder: Path, steps: int, batch: int, device: str, dtype, repeats: int) -> dict:
    from diffusers import DDIMPipeline, DDIMScheduler

    from fmconvert.sampling import generate, load_velocity_model

    vm = load_velocity_model(str(folder), dtype=dtype, device=device)
    pipe = DDIMPipeline.from_pretrained(folder, dtype=dtype).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                               set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_run():
        pipe(batch_size=batch, num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0))

    def fmconvert_run():
        generate(vm, batch, batch, 0, "euler", "trailing", steps, device)

    with torch.no_grad():
        theirs, ours = alternate(diffusers_run, fmconvert_run, repeats, device)
    return {"diffusers_s": theirs, "fmconvert_s": ours, "ratio": ours / theirs}


def _peak_rss_mb(code: str) -> tuple[float, float, float]:
    """(seconds, peak RSS in MB, the FID it printed) of a fresh Python process running ``code``."""
    import json

    wrapped = code + "\nimport resource, json\nprint(json.dumps([__import__('time').perf_counter() - _t0, " \
                     "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))\n"
    out = subprocess.run([sys.executable, "-c", "import time; _t0 = time.perf_counter()\n" + wrapped],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    seconds, peak = json.loads(lines[-1])
    return seconds, peak, float(lines[-2])


def bench_fid(images: int, device: str, repeats: int, work: Path) -> dict:
    """FID of `images` digits (3-channel uint8) against the held-out... with the same weights,
    fmconvert (streamed features + torchmetrics) vs torch-fidelity's calculate_metrics."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    weights = work / "inception-random.pth"
    if not weights.exists():
        with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), \
                mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
            torch.manual_seed(0)
            model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        state = model.state_dict()
        for name in state:
            if name.endswith("running_var"):
                state[name] = torch.full_like(state[name], 0.05)
        torch.save(state, weights)
    common = f"""
import torch, sys
sys.path.insert(0, {str(ROOT)!r})
torch.set_num_threads({torch.get_num_threads()})
from fmconvert.digits import load_digits
imgs = load_digits().images.expand(-1, 3, -1, -1)
reps = -(-{images} // len(imgs))
imgs = imgs.repeat(reps, 1, 1, 1)[:{images}].contiguous()
real, fake = imgs, imgs.flip(-1)
"""
    ours = common + f"""
from fmconvert.fid import make_extractor, stats_of, fid_between
ex = make_extractor("inception", {str(weights)!r}, device={device!r})
batches = lambda t: (t[i:i + 100] for i in range(0, len(t), 100))
value = fid_between(stats_of(batches(real), ex, {device!r}), stats_of(batches(fake), ex, {device!r}))
print(value)
"""
    theirs = common + f"""
import torch_fidelity
class D(torch.utils.data.Dataset):
    def __init__(self, t): self.t = t
    def __len__(self): return len(self.t)
    def __getitem__(self, i): return self.t[i]
value = torch_fidelity.calculate_metrics(input1=D(fake), input2=D(real), fid=True, cuda={device.startswith('cuda')},
    batch_size=100, feature_extractor_weights_path={str(weights)!r}, verbose=False, cache=False, save_cpu_ram=True)["frechet_inception_distance"]
print(value)
"""
    runs_ours, runs_theirs = [], []
    for _ in range(repeats):
        runs_theirs.append(_peak_rss_mb(theirs))
        runs_ours.append(_peak_rss_mb(ours))
    t_ours = statistics.median(r[0] for r in runs_ours)
    t_theirs = statistics.median(r[0] for r in runs_theirs)
    return {"images": images, "fmconvert_s": t_ours, "torch_fidelity_s": t_theirs,
            "fmconvert_fid": runs_ours[0][2], "torch_fidelity_fid": runs_theirs[0][2],
            "throughput_ratio": t_theirs / t_ours, "fmconvert_peak_mb": max(r[1] for r in runs_ours),
            "torch_fidelity_peak_mb": max(r[1] for r in runs_theirs)}


def bench_sd15(device: str, dtype, repeats: int) -> list[tuple]:
    """SD 1.5-size UNet (860M, random): adapter vs bare forward, images/s, bf16 vs fp32 field."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from fmconvert import VelocityAdapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval().to(device)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x = torch.randn(4, 4, 64, 64, device=device)
    hidden = torch.randn(4, 77, 768, device=device)
    with torch.no_grad():
        reference = VelocityAdapter.from_diffusion(unet, scheduler).evaluate(x, torch.full((4,), 500.0, device=device),
                                                                             encoder_hidden_states=hidden, output_dtype=torch.float64)
        low = unet.to(dtype)
        adapter = VelocityAdapter.from_diffusion(low, scheduler)
        u = adapter.evaluate(x, torch.full((4,), 500.0, device=device), encoder_hidden_states=hidden.to(dtype),
                             output_dtype=torch.float64)
        agreement = ((u - reference).norm() / reference.norm()).item()
        t, tau = torch.full((4,), 500, device=device), torch.full((4,), 500.0, device=device)
        bare, ours = alternate(lambda: low(x.to(dtype), t, encoder_hidden_states=hidden.to(dtype)).sample,
                               lambda: adapter(x.to(dtype), tau, encoder_hidden_states=hidden.to(dtype)).sample, repeats, device)
    return [(f"adapter forward vs bare, SD1.5-size UNet (860M, random), batch 4, 64×64 latents, {dtype}",
             f"{bare * 1e3:.1f} ms ({4 / bare:.1f} img/s)", f"{ours * 1e3:.1f} ms ({4 / ours:.1f} img/s)",
             f"{ours / bare:.3f}", "<= 1.02"),
            (f"field agreement {dtype} vs float32, SD1.5-size UNet, s = 0.5", "", f"rel. L2 {agreement:.2e}", "", "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fid-images", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images (a smoke run)")
    parser.add_argument("--skip-fid", action="store_true")
    parser.add_argument("--sd15", action="store_true", help="also a Stable Diffusion 1.5-size UNet2DConditionModel "
                        "(random weights): adapter overhead and the bf16-vs-fp32 field agreement")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.fid_images = 2, 300
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    from diffusers import DDPMPipeline, DDPMScheduler

    import diffusers
    import fmconvert
    import fmconvert.zoo

    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cifar = cifar_unet()
        params = sum(p.numel() for p in cifar.parameters()) / 1e6
        DDPMPipeline(unet=cifar, scheduler=DDPMScheduler()).save_pretrained(work / "cifar")
        models = {f"UNet2DModel ddpm-cifar10-32 layout ({params:.1f}M, random)": (cifar, work / "cifar"),
                  "builtin:digits-eps (1.6M)": (None, fmconvert.zoo.builtin_path("digits-eps", kind="model"))}
        for name, (model, folder) in models.items():
            if model is None:
                model = diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
            f = bench_forward(model, DDPMScheduler(), args.batch, args.device, dtype, args.repeats)
            rows.append((f"adapter forward vs bare forward, {name}, batch {args.batch}", f"{f['bare_s'] * 1e3:.1f} ms",
                         f"{f['fmconvert_s'] * 1e3:.1f} ms", f"{f['ratio']:.3f}", "<= 1.02"))
            if f["ratio"] > 1.02:
                failures.append(rows[-1][0])
            s = bench_sampling(folder, args.steps, args.batch, args.device, dtype, args.repeats)
            rows.append((f"Euler {args.steps} steps vs DDIMPipeline {args.steps} steps, {name}, batch {args.batch}",
                         f"{s['diffusers_s']:.3f} s", f"{s['fmconvert_s']:.3f} s", f"{s['ratio']:.3f}", "<= 1.00"))
            if s["ratio"] > 1.00:
                failures.append(rows[-1][0])
        if args.sd15:
            rows += bench_sd15(args.device, dtype, args.repeats)
        fid_rows = []
        if not args.skip_fid:
            for count in (args.fid_images // 2, args.fid_images):
                r = bench_fid(count, args.device, max(1, args.repeats // 2), work)
                fid_rows.append(r)
                rows.append((f"FID of {count} images (Inception, same weights): throughput", f"{r['torch_fidelity_s']:.1f} s",
                             f"{r['fmconvert_s']:.1f} s", f"{r['throughput_ratio']:.3f}", ">= 1.0"))
                if r["throughput_ratio"] < 1.0:
                    failures.append(rows[-1][0])
                if abs(r["fmconvert_fid"] - r["torch_fidelity_fid"]) > 1e-3 * abs(r["torch_fidelity_fid"]):
                    failures.append(f"FID values differ at {count} images")
    lines = [
        "# Benchmarks", "",
        f"`python scripts/bench.py {' '.join(sys.argv[1:])}` on {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads, device {args.device}, dtype {args.dtype}; torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, fmconvert {fmconvert.__version__}, {time.strftime('%Y-%m-%d')}. "
        f"Medians of {args.repeats} alternating repeats.", "",
        "| comparison | baseline | fmconvert | ratio | target |", "|---|---|---|---|---|",
    ] + [f"| {' | '.join(row)} |" for row in rows]
    if fid_rows:
        lines += ["", "FID values and peak resident memory (whole process) at two image counts:", "",
                  "| images | fmconvert FID | torch-fidelity FID | fmconvert peak MB | torch-fidelity peak MB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['images']} | {r['fmconvert_fid']:.6f} | {r['torch_fidelity_fid']:.6f} | {r['fmconvert_peak_mb']:.0f} | "
                  f"{r['torch_fidelity_peak_mb']:.0f} |" for r in fid_rows]
    lines += ["", "Targets missed: " + ("; ".join(failures) if failures else "none"), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
