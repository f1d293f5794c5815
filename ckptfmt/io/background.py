"""Two helper threads for the work that overlaps the main thread's I/O: hashing a source while
it is converted, fsyncing while data is still written, digesting while torch imports.

One pool for the process, started on first use, rather than one per file: starting threads
costs milliseconds, which a folder of 500 small checkpoints pays 1,000 times. No task waits
for another task, so two workers cannot deadlock.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

__all__ = ["helpers"]


@functools.cache
def helpers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckptfmt")
