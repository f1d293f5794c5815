"""The `ckptfmt` command: a thin layer over the library.

Results go to stdout (pure JSON with --json); progress, warnings and errors to stderr. A user
error is one line, `Error: FILE: problem; fix`, and exit 1 (usage errors exit 2); never a
traceback. Commands that take many files report each failed one as one `[FAIL] FILE: problem`
line on stderr, go on with the rest, and exit 1.
Heavy modules are imported inside the commands, so `ckptfmt --help` and `ckptfmt inspect` of a
.safetensors never import torch.

`app` holds the group and what the commands share; each command module adds its commands to
the group when imported here.
"""

from . import convert, inspect, predict  # noqa: F401  (each registers its commands on `main`)
from .app import main, run

__all__ = ["main", "run"]
