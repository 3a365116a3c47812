"""Returning freed memory to the operating system between the chunks of a streaming stage."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _libc():
    try:  # glibc by its soname (ctypes.util.find_library would spawn ldconfig: seconds)
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to trim
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; elsewhere nothing).

    A stage that streams chunks allocates and frees buffers of varying sizes (a chunk's padded batches,
    attention, its CSR parts). glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MiB)
    in the heap, where they fragment: the resident set then grows with the number of chunks although
    the live memory does not. Called once per chunk, it keeps the peak resident set at one chunk's
    working memory (a few ms a call)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
