"""Why torch.load refused a legacy checkpoint, said from our own reading of its pickle.

torch's weights-only unpickler raises `pickle.UnpicklingError` for whatever it will not read;
the full unpickler raises AttributeError or ImportError for a class it cannot find. Which global
was refused, or which class is missing, is read here from the pickle itself, op by op with
`pickletools` and without building anything, never from the text of torch's message.
"""

from __future__ import annotations

import pickle
import pickletools
import sys
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import LegacyCheckpointError, UnsafePickleError, Words
from .standins import globals_in_legacy_pickles, python3_name

__all__ = ["damaged", "globals_named", "missing_class", "needs_global", "unlisted_globals", "unreadable"]

# Only `convert` takes --unsafe-pickle on the command line: a trusted pickle is converted once,
# and everything after works on the safe file.
_UNSAFE_FIX = Words("If you trust this file, convert it with `convert(SOURCE, unsafe_pickle=True)`",
                    "If you trust this file, convert it with `ckptfmt convert SOURCE --unsafe-pickle`")


def unlisted_globals(f: BinaryIO, serialization: str) -> list[str]:
    """The globals the file's pickle names that torch's allowlist does not hold, in the order the
    unpickler meets them, found without unpickling anything."""
    # Spelled as torch's unpickler looks names up, less those its allowlist holds.
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING
    from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals

    allowed = {*_get_allowed_globals(), *_get_user_allowed_globals()}
    spelled = []
    for name in globals_named(f, serialization):
        module, _, attribute = name.rpartition(".")
        module, attribute = NAME_MAPPING.get((module, attribute), (IMPORT_MAPPING.get(module, module), attribute))
        spelled.append(f"{module}.{attribute}")
    return [name for name in dict.fromkeys(spelled) if name not in allowed]


def globals_named(f: BinaryIO, serialization: str) -> list[str]:
    """The globals the file's pickles name, `module.attribute` as the file spells them, in the
    order an unpickler meets them, read op by op without building anything. A damaged pickle
    ends the scan: the globals before the damage are the answer."""
    f.seek(0)
    try:
        if serialization != "torch zip":
            return globals_in_legacy_pickles(f)
        with zipfile.ZipFile(f) as archive:
            data = archive.read(next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, StopIteration):
        return []
    finally:
        f.seek(0)
    names: list[str] = []
    strings: list[str] = []  # the last two pushed: protocol 4's STACK_GLOBAL takes its names from them
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                module, _, attribute = argument.partition(" ")
                names.append(f"{module}.{attribute}")
            elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                names.append(".".join(strings))
            elif isinstance(argument, str):
                strings = [*strings[-1:], argument]
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError):
        pass
    return list(dict.fromkeys(names))


def damaged(exc: BaseException, path: Path) -> LegacyCheckpointError:
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return LegacyCheckpointError(
        f"cannot be read as a torch checkpoint ({type(exc).__name__}: {first_line}); "
        "it is damaged, truncated or not a checkpoint",
        path=path,
    )


def unreadable(exc: pickle.UnpicklingError, path: Path) -> UnsafePickleError:
    """torch's weights-only unpickler refused the file, though not for a global it names."""
    # torch re-raises its unpickler's error inside a long explanation, `from None`: the error it
    # re-raised (the context) is the short one, shown as it is.
    context = exc.__context__
    detail = (str(context).strip().splitlines() or [""])[0][:200] if isinstance(context, pickle.UnpicklingError) else ""
    return UnsafePickleError(
        "refused to unpickle: the safe (weights-only) loader cannot read it"
        f"{f' ({detail})' if detail else ''}; it may be a plain pickle rather than a torch.save file.",
        path=path, fix=_UNSAFE_FIX,
    )


def missing_class(exc: AttributeError | ImportError, names: list[str], path: Path) -> LegacyCheckpointError:
    """The full unpickler needs the saving program's own classes, importable here: the first of
    the file's globals that is not (its module is missing, or lacks it), named."""
    for name in names:
        module, _, attribute = python3_name(name).rpartition(".")
        if isinstance(exc, ImportError):
            if not exc.name or (module != exc.name and not module.startswith(f"{exc.name}.")):
                continue
            where = f"the module {module!r}, which is not importable here"
        elif module not in sys.modules or _has(sys.modules[module], attribute):
            continue
        elif module == "__main__":
            where = "the script that saved it (__main__), which no other program can import"
        else:
            where = f"the module {module!r}, which has no {attribute} here"
        return LegacyCheckpointError(
            f"is a pickled {attribute}, a class of {where}; in that program, save model.state_dict() "
            "instead, or make the class importable here",
            path=path,
        )
    return damaged(exc, path)


def _has(module: Any, qualified_name: str) -> bool:
    value = module
    for part in qualified_name.split("."):
        if not hasattr(value, part):
            return False
        value = getattr(value, part)
    return True


def needs_global(name: str, path: Path) -> UnsafePickleError:
    return UnsafePickleError(
        f"refused to unpickle: it needs the global {name}, which the safe (weights-only) loader "
        "does not allow because unpickling it can run code.",
        path=path, fix=_UNSAFE_FIX,
    )
