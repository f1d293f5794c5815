"""Code that is not ours, imported so that it cannot silence, corrupt or stop the command.

An installed plugin's module (an entry point of `ckptfmt.models`) and a module of the user's
(`ckptfmt --import`) run their own code when imported. Whatever that code does, the command
learns of it and says it:

- it raises, or calls `sys.exit()`: the exception comes back to the caller, which names the
  module (a `SystemExit` raised at import would otherwise end the command with exit code 0,
  having said and written nothing). KeyboardInterrupt is the user's, and passes.
- it prints: what it writes to stdout is set aside and handed back, for the caller to report.
  stdout carries the command's report and its `--json` document; a plugin's line in it would
  corrupt both.
- it hangs: the import runs in a helper thread, waited for at most `CKPTFMT_PLUGIN_TIMEOUT`
  seconds (default 60: a cold import of torch on a loaded machine takes several). Python cannot
  stop a thread from outside, so a hung import is left where it is, as a daemon thread: it ends
  with the process, holds only the import lock of its own module (which the caller then no
  longer asks for), and its stdout stays set aside. An import in a subprocess could be killed,
  but would not give this process the module.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["TIMEOUT_ENV", "ImportTimeout", "import_failure", "import_guarded", "printed_words"]

TIMEOUT_ENV = "CKPTFMT_PLUGIN_TIMEOUT"
_DEFAULT_TIMEOUT = 60.0


def import_guarded(load: Callable[[], Any]) -> tuple[Any, str]:
    """Call `load`, an import of code that is not ours, in a helper thread, its stdout set aside.

    Returns:
        What `load` returned, and what it printed to stdout ("" for nothing).

    Raises:
        BaseException: whatever `load` raised, SystemExit and KeyboardInterrupt included.
        ImportTimeout: `load` had not returned after `CKPTFMT_PLUGIN_TIMEOUT` seconds.

    Example:
        >>> module, printed = import_guarded(lambda: importlib.import_module("mynets"))
    """
    timeout = _timeout()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = load()
        except BaseException as exc:  # handed to the caller's thread, which decides
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="ckptfmt-plugin-import", daemon=True)
    diverted = _Diverted(sys.stdout, thread)
    sys.stdout = diverted
    try:
        thread.start()
        thread.join(timeout)
    finally:
        if not thread.is_alive() and sys.stdout is diverted:
            sys.stdout = diverted.stream  # a hung import's later output stays set aside
    if thread.is_alive():
        raise ImportTimeout(f"still importing after {timeout:g} s; set {TIMEOUT_ENV}=SECONDS to wait longer")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"], diverted.kept.getvalue()


def import_failure(exc: BaseException, *, where: str = "") -> str:
    """What an import did instead of finishing, said after "the module ...": `failed to import
    (WHERE: RuntimeError: no GPU here)`, `failed to import (WHERE: SystemExit: 0)`, or `did not
    finish importing (WHERE: still importing after 60 s; ...)`."""
    prefix = f"{where}: " if where else ""
    if isinstance(exc, ImportTimeout):
        return f"did not finish importing ({prefix}{exc})"
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"failed to import ({prefix}{type(exc).__name__}: {first_line})"


def printed_words(printed: str) -> str:
    """The first line of what an import printed, quoted for a warning."""
    lines = printed.strip().splitlines() or [""]
    more = f" (and {len(lines) - 1} more line(s))" if len(lines) > 1 else ""
    return f"{lines[0][:200]!r}{more}"


class ImportTimeout(TimeoutError):
    """An import that had not finished when the wait for it ended."""


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text.strip():
        return _DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds above 0")
    return value


class _Diverted:
    """sys.stdout while a plugin imports: what the importing thread writes is kept; what other
    threads write goes to the stream as before."""

    def __init__(self, stream: Any, thread: threading.Thread):
        self.stream, self.kept, self._thread = stream, io.StringIO(), thread

    def write(self, text: str) -> int:
        if threading.current_thread() is self._thread:
            return self.kept.write(text)
        return self.stream.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
