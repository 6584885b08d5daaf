"""The library speaks Python, the command line flags: a library error names the parameter and its
value (``checkpoint_every=0``), and the CLI shows the same message with the option
(``--checkpoint-every 0``, :func:`fmconvert.cli.output.in_flags`)."""

import ast
import re
from pathlib import Path

import pytest
from conftest import error
from diffusers import UNet2DModel  # noqa: F401 (its first import sets TORCHINDUCTOR_CACHE_DIR: here, not in a test)

import fmconvert
from fmconvert.errors import UsageError
from fmconvert.training.loop import train
from fmconvert.training.settings import TrainSettings

PACKAGE = Path(fmconvert.__file__).parent

#: strings of the library that may name a flag, (module, words in the string): another program's
#: command, and fmconvert command lines quoted as such (beside the Python way) or written into a
#: converted folder's model card
QUOTES_A_COMMAND = {
    ("integration/push.py", "hf repos settings"),
    ("integration/adapters.py", "`fmconvert sample --guidance-rescale"),
    ("integration/folder.py", "from the command line: `fmconvert sample"),
}


def _settings(**fields) -> TrainSettings:
    return TrainSettings(model="builtin:digits-eps", fingerprint="-", data="builtin:digits", data_fingerprint="-",
                         **fields)


def test_library_names_parameters_and_the_cli_names_flags(tmp_path):
    with pytest.raises(UsageError) as raised:
        train(_settings(), tmp_path / "out", checkpoint_every=0)
    assert str(raised.value).startswith("checkpoint_every=0: must be a positive integer")
    with pytest.raises(UsageError, match=r"^train_steps=0: must be a positive integer$"):
        _settings(train_steps=0)
    with pytest.raises(UsageError) as raised:
        train(_settings(), tmp_path / "out", device="tpu")
    assert "device='tpu'" in str(raised.value) and "--" not in str(raised.value)

    common = ("train", "builtin:digits-eps", "--data", "builtin:digits", "--out", tmp_path / "out")
    line = error(2, *common, "--checkpoint-every", 0)
    assert "--checkpoint-every 0: must be a positive integer" in line and "checkpoint_every" not in line
    line = error(2, *common, "--train-steps", 0)
    assert "--train-steps 0: must be a positive integer" in line and "train_steps" not in line


def _strings(tree: ast.AST):
    """(line, text) of every string literal but docstrings (bare string statements), f-strings
    with each replacement field as X (``--{flag}`` → ``--X``)."""
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    parts_of_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and id(node) not in parts_of_fstrings):
            yield node.lineno, node.value


def test_no_library_message_names_a_flag():
    """No message of the library (fmconvert/ outside cli/: what it raises, logs or warns) names a
    command-line flag; the CLI turns its ``name=value`` into ``--name value``. Strings quoting a
    command (:data:`QUOTES_A_COMMAND`) excepted."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module.startswith("cli/"):
            continue
        for line, text in _strings(ast.parse(path.read_text(), str(path))):
            if re.search(r"(?<![\w-])--[A-Za-z]", text) and not any(
                    module == allowed and words in text for allowed, words in QUOTES_A_COMMAND):
                found.append(f"fmconvert/{module}:{line}: {text!r}")
    assert not found, "library messages that name a flag (name the parameter: name=value):\n" + "\n".join(found)
