"""Several fmconvert commands run one after another in one process, as ``python -m fmconvert`` runs each:

    python tests/commands_in_one_process.py OUT COMMANDS_JSON

COMMANDS_JSON is a JSON list of argument lists. Command i's stdout goes to OUT/i.rank<R>.out and its
exit code to OUT/i.rank<R>.code (R: the torchrun rank, 0 alone). tests/sampling/test_distributed.py
launches it with torchrun, so that one launch (about 15 s of process start on the 2-core machine)
serves every command the two-process tests compare; the process group is joined once, by the first
command, and each later one finds it joined (fmconvert.sampling.distributed.init)."""

import contextlib
import json
import os
import sys
from pathlib import Path

from fmconvert.cli import app

out, commands = Path(sys.argv[1]), json.loads(sys.argv[2])
rank = os.environ.get("RANK", "0")
for i, args in enumerate(commands):
    code = 0
    with open(out / f"{i}.rank{rank}.out", "w") as output, contextlib.redirect_stdout(output):
        try:
            app(args, prog_name="fmconvert")
        except SystemExit as stop:
            code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    (out / f"{i}.rank{rank}.code").write_text(str(code))
    if code:
        sys.exit(code)
