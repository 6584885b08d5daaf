#!/usr/bin/env bash
# The main command: on a fresh machine, sets itself up, converts builtin:digits-eps into a
# flow-matching pipeline, samples it with Euler on the DDIM grid, and writes its samples
# beside the source's own DDIM samples from the same seeds.
#   scripts/demo.sh [OUT=demo]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
OUT=${1:-demo}
mkdir -p "$OUT"
fmconvert wrap builtin:digits-eps --out "$OUT/digits-eps-velocity" --force
fmconvert sample "$OUT/digits-eps-velocity" --solver euler --grid trailing --steps 50 --num-images 64 --seed 0 \
  --out "$OUT/converted-euler.png" --save-tensor "$OUT/converted-euler.safetensors"
fmconvert sample builtin:digits-eps --baseline ddim --steps 50 --num-images 64 --seed 0 \
  --out "$OUT/source-ddim.png" --save-tensor "$OUT/source-ddim.safetensors"
python - "$OUT" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fmconvert.images import make_grid, save_grid

out = Path(sys.argv[1])
ours = load_file(out / "converted-euler.safetensors")["samples"]
ddim = load_file(out / "source-ddim.safetensors")["samples"]
diff = ((ours - ddim).abs().max() / ddim.abs().max()).item()
# one picture: converted (left) | source DDIM (right)
pair = torch.stack([(ours / 2 + 0.5).clamp(0, 1), (ddim / 2 + 0.5).clamp(0, 1)])  # (2, N, 1, 8, 8)
left, right = (make_grid(p, columns=8).float() / 255 for p in pair)
gap = torch.ones(left.shape[0], left.shape[1], 8)
from fmconvert.images import _pil
from fmconvert.io import atomic_write
atomic_write(out / "side_by_side.png", lambda tmp: _pil((torch.cat([left, gap, right], dim=2) * 255).round().to(torch.uint8)).save(tmp, format="PNG"))
print(f"converted Euler vs source DDIM, 64 samples, 50 steps: max |difference| / max |x| = {diff:.2e}")
print(f"wrote {out}/converted-euler.png, {out}/source-ddim.png and {out}/side_by_side.png (left: converted, right: source)")
PY
