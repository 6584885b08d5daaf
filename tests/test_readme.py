"""The README's quick start, run verbatim: the commands are read from README.md's "Quick start"
block (between its snippet markers), never copied here, so the front page cannot rot. Each runs
in a fresh folder through the command line's entry point, the push against the loopback Hub."""

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import invoke

README = Path(__file__).resolve().parents[1] / "README.md"
TOKEN = "hf_fmconvertReadmeToken0123456789"


def quickstart_commands() -> list[list[str]]:
    """The quick start's commands: its bash block, continuation lines joined, comments dropped."""
    text = README.read_text()
    block = re.search(r"\[start:quickstart\].*?```bash\n(.*?)```.*?\[end:quickstart\]", text, re.S)
    assert block, "README.md has no quick-start block between its snippet markers"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_the_quick_start_is_fmconvert_commands_that_convert_sample_evaluate_and_publish():
    commands = quickstart_commands()
    assert all(argv[0] == "fmconvert" for argv in commands), commands
    assert [argv[1] for argv in commands][:1] == ["wrap"] and {"sample", "fid", "push"} <= {argv[1] for argv in commands}


def run_verbatim(commands):
    for argv in commands:
        result = invoke(*argv[1:])
        assert result.exit_code == 0, f"{shlex.join(argv)}\n{result.output}{result.stderr}"
        assert TOKEN not in result.output + result.stderr


# the quick start in two tests, which pytest-xdist's workers can run side by side: its FID sweep, which
# stands alone, and the rest, in the README's order (each command takes the folder the one before wrote)
@pytest.mark.slow
def test_the_readme_quick_start_runs_verbatim(tmp_path, monkeypatch, hub):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run_verbatim([argv for argv in quickstart_commands() if argv[1] != "fid"])
    assert Path("samples.png").stat().st_size > 0
    folder = Path("digits-velocity")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["tuned_times"]
    (repo_id,) = hub.repos  # what push published, private as the README says
    assert hub.repos[repo_id].private and folder.name in repo_id


@pytest.mark.slow
def test_the_readme_quick_starts_fid_sweep_runs_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (fid,) = [argv for argv in quickstart_commands() if argv[1] == "fid"]
    run_verbatim([fid])
    assert Path("fid.png").stat().st_size > 0
