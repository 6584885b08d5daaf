"""The suite's isolation (tests/conftest.py, ``_isolated``): a test that leaves torch's global state
or the environment changed fails, naming what it changed, and the next test finds it restored;
the ``threads`` marker pins the thread count for one test."""

from pathlib import Path

pytest_plugins = ["pytester"]

LEAKY = '''
import os

import pytest
import torch

START = torch.get_num_threads()


def test_a_leaks_threads():
    torch.set_num_threads(START + 1)


def test_b_finds_threads_restored():
    assert torch.get_num_threads() == START


def test_c_leaks_the_default_dtype():
    torch.set_default_dtype(torch.float64)


def test_d_finds_float32():
    assert torch.get_default_dtype() == torch.float32


def test_e_leaks_grad_mode_and_determinism():
    torch.set_grad_enabled(False)
    torch.use_deterministic_algorithms(True)


def test_f_finds_them_restored():
    assert torch.is_grad_enabled() and not torch.are_deterministic_algorithms_enabled()


def test_g_leaks_an_environment_variable():
    os.environ["FMCONVERT_LEAKED"] = "1"


def test_h_finds_the_environment_restored():
    assert "FMCONVERT_LEAKED" not in os.environ


def test_i_seeds_torch():
    torch.manual_seed(123)


def test_j_finds_the_generator_as_before_the_seed():
    assert not torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())


def test_k_uses_monkeypatch(monkeypatch):
    monkeypatch.setenv("FMCONVERT_PATCHED", "1")


@pytest.mark.threads(1)
def test_l_pins_one_thread():
    assert torch.get_num_threads() == 1
'''


def test_a_test_that_leaks_global_state_fails_and_the_next_finds_it_restored(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_leaky=LEAKY)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-o",
                                           "markers=threads(n): pinned threads", "-W", "ignore")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 12 and outcomes.get("errors") == 4, result.stdout.str()[-3000:]
    text = result.stdout.str()
    for leaked in ("test_a_leaks_threads", "test_c_leaks_the_default_dtype", "test_e_leaks_grad_mode_and_determinism",
                   "test_g_leaks_an_environment_variable"):
        assert f"ERROR at teardown of {leaked}" in text
    for named in ("torch threads", "torch default dtype", "torch grad mode", "torch deterministic algorithms",
                  "FMCONVERT_LEAKED: '(unset)' -> '1'"):
        assert named in text
