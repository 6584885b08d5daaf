#!/usr/bin/env python
"""Train the bundled digits zoo (seeded, reproducible) and write it into fmconvert/zoo/.

    python scripts/train_zoo.py all            # data, classifier, then the three models
    python scripts/train_zoo.py digits-eps     # one model
    python scripts/train_zoo.py digits-flow --steps 200 --out /tmp/zoo   # a quick look

The three generative models share the data (the 1,500-image train split), the network
(UNet2DModel, 8×8, block_out_channels (48, 96), attention at 4×4, 1.57M parameters), the
optimiser (AdamW, lr 5e-4, 200 warm-up steps, cosine decay to 10%), batch 128, the number
of steps and the EMA (decay 0.999); only the path and the regression target differ:

- digits-eps:  DDPM linear betas (1e-4..0.02, T = 1000), t ~ U{0..999}, target ε;
- digits-v:    squaredcos_cap_v2, t ~ U{0..999}, target v = α·ε − σ·x0;
- digits-flow: rectified flow, s ~ U(0, 1), x_s = (1 − s)·x0 + s·ε, timestep 1000·s, target ε − x0.

The classifier (builtin:digits-features) trains on the same split with labels.
The loss curve is printed every 250 steps. Torch runs on 2 threads, as on the CI machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel  # noqa: E402

from fmconvert.math.paths import DiscreteVPSchedule, RectifiedFlow  # noqa: E402
from fmconvert.math.predictions import from_x0_eps  # noqa: E402
from fmconvert.zoo.datasets import build_digits, save_digits  # noqa: E402
from fmconvert.zoo.digits import DigitsClassifier  # noqa: E402

MODELS = {
    "digits-eps": {"scheduler": lambda: DDPMScheduler(beta_schedule="linear", prediction_type="epsilon"), "target": "epsilon"},
    "digits-v": {"scheduler": lambda: DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
                 "target": "v_prediction"},
    "digits-flow": {"scheduler": lambda: FlowMatchEulerDiscreteScheduler(), "target": "flow_prediction"},
}
SEEDS = {"digits-eps": 1, "digits-v": 2, "digits-flow": 3, "digits-features": 4}


def make_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(48, 96), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16, attention_head_dim=32,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def noisy_batch(name: str, x0: torch.Tensor, generator: torch.Generator):
    """(x_t, timestep, target) for one batch on the model's own path."""
    eps = torch.randn(x0.shape, generator=generator)
    n = x0.shape[0]
    if name == "digits-flow":
        path = RectifiedFlow()
        s = torch.rand(n, generator=generator, dtype=torch.float64)
        timestep = path.model_timestep(s)
    else:
        path = DiscreteVPSchedule.from_config(dict(MODELS[name]["scheduler"]().config))
        s = torch.randint(0, 1000, (n,), generator=generator).to(torch.float64)
        timestep = s.float()
    p = path.point(s).view_as_batch(4)
    x = (p.alpha * x0.double() + p.sigma * eps.double()).float()
    target = from_x0_eps(MODELS[name]["target"], x0.double(), eps.double(), p).float()
    return x, timestep, target


def train_model(name: str, steps: int, out: Path, batch: int = 128, lr: float = 5e-4) -> None:
    from fmconvert.zoo.datasets import load_digits

    torch.manual_seed(SEEDS[name])
    generator = torch.Generator().manual_seed(SEEDS[name])
    data = load_digits("train").data
    unet = make_unet()
    ema = make_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    print(f"{name}: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, {steps} steps of {batch}", flush=True)
    started, running = time.time(), 0.0
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(0, len(data), (batch,), generator=generator)
        x, timestep, target = noisy_batch(name, data[idx], generator)
        loss = torch.nn.functional.mse_loss(unet(x, timestep).sample, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            count = 250 if (step + 1) % 250 == 0 else (step + 1) % 250
            print(f"{name} step {step + 1:5d}  loss {running / count:.4f}  lr {lr_at(step, steps, lr):.2e}  "
                  f"{time.time() - started:6.0f} s", flush=True)
            running = 0.0
    folder = out / name
    DDPMPipeline(unet=ema.eval(), scheduler=MODELS[name]["scheduler"]()).save_pretrained(folder)
    (folder / "README.md").write_text(
        f"# builtin:{name}\n\nTrained by `scripts/train_zoo.py {name} --steps {steps}` (seed {SEEDS[name]}) on the "
        "1,500-image train split of scikit-learn's digits (8×8, data x = v/8 − 1). EMA weights (decay 0.999).\n"
    )
    print(f"{name}: wrote {folder} in {time.time() - started:.0f} s", flush=True)


def train_classifier(out: Path, epochs: int = 60) -> None:
    from fmconvert.zoo.datasets import load_digits

    torch.manual_seed(SEEDS["digits-features"])
    generator = torch.Generator().manual_seed(SEEDS["digits-features"])
    train, held = load_digits("train"), load_digits("held_out")
    model = DigitsClassifier()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train.images), generator=generator)
        total = 0.0
        for first in range(0, len(order), 64):
            idx = order[first:first + 64]
            images = train.images[idx]
            # small random shifts (±1 pixel) so the features do not hinge on exact placement
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(images), train.labels[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0:
            model.eval()
            with torch.no_grad():
                accuracy = (model(held.images).argmax(1) == held.labels).float().mean().item()
            print(f"digits-features epoch {epoch + 1:3d}  loss {total / len(order):.4f}  held-out accuracy {accuracy:.4f}",
                  flush=True)
    model.eval()
    with torch.no_grad():
        accuracy = (model(held.images).argmax(1) == held.labels).float().mean().item()
    folder = out / "digits-features"
    model.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({"held_out_accuracy": accuracy, "held_out_size": len(held.images)}) + "\n")
    print(f"digits-features: held-out accuracy {accuracy:.4f} ({len(held.images)} images); wrote {folder}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["all", "data", "digits-features", *MODELS])
    parser.add_argument("--steps", type=int, default=4000, help="training steps per generative model")
    parser.add_argument("--out", type=Path, default=ROOT / "fmconvert" / "zoo")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.what in ("all", "data"):
        from fmconvert.zoo.datasets import digits_path

        save_digits(build_digits(), digits_path())
        print(f"digits: wrote {digits_path()}", flush=True)
    if args.what in ("all", "digits-features"):
        train_classifier(args.out)
    for name in MODELS:
        if args.what in ("all", name):
            train_model(name, args.steps, args.out)


if __name__ == "__main__":
    main()
