"""The `ckptfmt` command group and what every command shares: the group itself (`main`), the
console script (`run`), one-line user errors (`user_errors`), safe report lines (`out`,
`shown`), warnings and log records as `warning: ...` lines, `--json` output and `--set` parsing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import warnings
from typing import Any

import click

from ..errors import CkptfmtError, CkptfmtWarning, Words
from ..version import __version__

logger = logging.getLogger("ckptfmt")


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        # A record that names an argument is logged as Words; here it says the option.
        text = record.msg.cli if isinstance(record.msg, Words) and not record.args else record.getMessage()
        out(f"{prefix}{text}", err=True)


# Control characters, and surrogates (a file name that is not valid UTF-8, as Python reads it):
# printed raw, a surrogate becomes a stray byte, a C1 control on an 8-bit terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def shown(text: Any) -> str:
    """`text` with control characters escaped (\\n, \\e, \\x07, ...), as ls and git show
    names: file names, tensor names and strings from files are untrusted, and a raw escape
    sequence or newline in them could rewrite the terminal or forge a report line."""
    return _CONTROL.sub(_escaped, str(text))


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8: shown as that byte
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return _NAMED.get(match.group(), f"\\x{code:02x}")


def out(line: str = "", *, err: bool = False) -> None:
    """One report line, made safe: every line the CLI prints goes through here (JSON output is
    safe by construction and goes through `echo_json`)."""
    click.echo(shown(line), err=err)


def user_errors(command):
    """Turn our errors, and the OS errors a user can cause, into one line and exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            try:
                return command(*args, **kwargs)
            finally:
                sys.stdout.flush()  # a closed pipe shows here, where click ends the command quietly
        except BrokenPipeError:
            raise  # `ckptfmt inspect X --tensors | head -1`: click exits quietly, as ls does
        except CkptfmtError as exc:
            raise click.ClickException(shown(exc.describe(cli=True))) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own ending of a command, said by click
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(shown(f"{where}{exc.strerror or exc}")) from None
        except Exception as exc:
            # A bug here or in an architecture's code: one line all the same; the traceback on request.
            if os.environ.get("CKPTFMT_TRACEBACK"):
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise click.ClickException(shown(
                f"unexpected {type(exc).__name__}: {first_line} (a bug: please report it, with the traceback "
                "that CKPTFMT_TRACEBACK=1 shows)")) from None

    return wrapper


def run() -> None:
    """The `ckptfmt` command. Once a command has flushed its output (every file it wrote is
    already synced and closed), the process ends at once when torch was imported, rather than
    spending half a second in torch's interpreter teardown."""
    try:
        main.main(prog_name="ckptfmt")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    if "torch" in sys.modules:
        os._exit(code)
    sys.exit(code)


IMPORT_ENV = "CKPTFMT_IMPORT"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ckptfmt")
@click.option("-v", "--verbose", is_flag=True, help="Also show informational messages on stderr.")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Import MODULE first (repeatable): a module of yours that registers an architecture with "
                   "@ckptfmt.register_model, found from the current folder as `python -m` finds it. "
                   f"{IMPORT_ENV}=a,b does the same.")
def main(verbose: bool, imports: tuple[str, ...]) -> None:
    """Self-describing PyTorch checkpoints.

    One .safetensors file holds the weights and, in its header, the architecture config,
    training record, provenance and a digest of the weights.

    \b
    Example:
        ckptfmt convert checkpoints/ -o converted/    # every .pth, .pt and .ckpt under a folder
        ckptfmt inspect converted/multitask_joint/best_model.safetensors

    A class of your own is used by importing the module that registers it first, e.g.
    `ckptfmt --import mynets convert sd.pth --model-type smallcnn --set width=8`.
    """
    logger.handlers[:] = [_StderrHandler()]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False
    warnings.showwarning = _show_warning
    from_env = [name.strip() for name in os.environ.get(IMPORT_ENV, "").split(",") if name.strip()]
    import_user_modules([*from_env, *imports])


def import_user_modules(names: list[str]) -> None:
    """Import the user's modules that register architectures, as `python -m` finds modules: the
    current folder first, then the installed packages. A module that fails (raises, exits, or
    hangs) is one error naming it; what it prints is set aside, said as a warning."""
    if not names:
        return
    import importlib

    from ..config.plugins import import_failure, import_guarded, printed_words

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            _, printed = import_guarded(functools.partial(importlib.import_module, name))
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                raise click.ClickException(shown(
                    f"--import {name}: no module named {exc.name!r} in the current folder or the installed "
                    "packages")) from None
            raise click.ClickException(shown(f"--import {name}: the module failed to import (ModuleNotFoundError: "
                                             f"{exc})")) from None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # its own code: an error, or even sys.exit(), ends this one way
            raise click.ClickException(shown(f"--import {name}: the module {import_failure(exc)}")) from None
        if printed:
            out(f"warning: --import {name}: the module printed while being imported; set aside: "
                f"{printed_words(printed)}", err=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings reach the user as one `warning: ...` line, not Python's file-and-line form, in
    the command line's words."""
    text = message.describe(cli=True) if isinstance(message, CkptfmtWarning) else str(message)
    out(f"warning: {text}", err=True)


def parse_set(values: tuple[str, ...]) -> dict[str, Any]:
    from ..io.jsondoc import loads_strict

    overrides = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        try:
            overrides[key] = loads_strict(raw, what=f"--set {key}")
        except CkptfmtError:
            overrides[key] = raw  # not JSON: a plain string, as in --set description=joint run
    return overrides


def echo_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, sort_keys=True))  # json.dumps escapes control characters

