"""CUDA checks (scripts/gpu_check.sh runs them on a GPU; skipped elsewhere): the identities on
CUDA in float32 (TF32 off: it is not float32), finite outputs in bfloat16, and the fast path."""

import pytest
import torch
from conftest import make_unet
from integration.test_adapters import ddim, mapped_sigmas, noise, rel_max, run_ddim, run_flowmatch_euler

from fmconvert import VelocityAdapter

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("prediction_type, beta_schedule", [("epsilon", "linear"), ("v_prediction", "squaredcos_cap_v2")])
def test_ddim_identity_on_cuda(prediction_type, beta_schedule):
    unet = make_unet().cuda()
    scheduler = ddim(beta_schedule, prediction_type)
    eps = noise().cuda()
    reference = run_ddim(unet, scheduler, eps.clone(), 50)
    wrapped = VelocityAdapter.from_diffusion(unet, scheduler)
    p = wrapped.source_path.point(scheduler.timesteps[:1])
    start = (eps.double() / (p.alpha + p.sigma).cuda()).float()
    ours = run_flowmatch_euler(wrapped, mapped_sigmas(wrapped.source_path, scheduler.timesteps.cpu()), start)
    assert rel_max(ours, reference) <= 1e-5


def test_bfloat16_fast_path_is_finite_and_close():
    unet = make_unet().cuda()
    wrapped = VelocityAdapter.from_diffusion(unet, ddim("linear"))
    fast = VelocityAdapter.from_diffusion(make_unet().cuda().to(torch.bfloat16).to(memory_format=torch.channels_last),
                                          ddim("linear"))
    x = torch.randn(8, 3, 8, 8, device="cuda")
    s = torch.tensor([0.0, 0.001, 0.3, 0.5, 0.7, 0.99, 0.9999, 1.0], device="cuda")
    with torch.no_grad():
        u32 = wrapped.evaluate(x, 1000 * s, output_dtype=torch.float64)
        u16 = fast.evaluate(x, 1000 * s, output_dtype=torch.float64)
    assert torch.isfinite(u16).all()
    assert ((u16 - u32).norm() / u32.norm()).item() < 0.05


def _sync_warnings(fn) -> int:
    """How many host-device synchronisations ``fn`` makes (torch's sync debug mode, in warn mode)."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")  # (it announces itself with a warning of its own: not counted)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_sampling_loop_adds_no_synchronisation():
    """Euler through the adapter synchronises no more often than the bare network alone
    called as often (the NFE is a Python int; times stay on the CPU grid)."""
    from fmconvert.math.solvers import solve

    unet = make_unet().cuda()
    wrapped = VelocityAdapter.from_diffusion(unet, ddim("linear"))
    x = torch.randn(4, 3, 8, 8, device="cuda")
    grid = torch.linspace(1, 0, 11, dtype=torch.float64)
    t = torch.full((4,), 500, device="cuda")
    field = lambda y, s: wrapped.evaluate(y, 1000 * s)  # noqa: E731
    with torch.no_grad():
        unet(x, t)  # the network's own first-call work is not ours
        first = _sync_warnings(lambda: solve(field, x, grid))  # plans made (CPU) and sent (non_blocking)
        again = _sync_warnings(lambda: solve(field, x, grid))  # plans remembered
        bare = _sync_warnings(lambda: [unet(x, t) for _ in range(10)])
    # solve() reads its NaN flag once, after the loop
    assert first <= bare + 1 and again <= bare + 1
