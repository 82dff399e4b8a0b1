"""How many cores torch may use in the calling thread.

torch's OpenMP runtime (libgomp, bundled with torch on Linux) gives every thread that starts a parallel
region a pool of helper threads, kept for as long as that thread lives. Once it manages more threads than the
machine has cores, libgomp stops spinning at barriers and puts every team to sleep at each one, the evaluation
worker's included. Measured on the dashboard (2 cores, the embedded set): one session's script thread had
computed a softmax, which left one more pool alive. After that, the worker's threads slept about 4,000 times per
update instead of a few, and an update took 4.7-5.3 s instead of 3.2-3.8 s.

A long-lived thread that only does light torch work (a Streamlit session's script thread) is therefore kept on
one core, where torch starts no team at all. Elsewhere (no libgomp, no MKL in torch) this does nothing.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from pathlib import Path

import torch

from engine.core.memo import memo

# The per-thread setters of the two runtimes torch's CPU kernels run their parallel regions in, and how each
# takes its count: OpenMP's by value; MKL, linked into libtorch_cpu, exports only its by-reference (Fortran)
# entry point under these names.
SETTERS = (("libgomp*.so*", "omp_set_num_threads", ctypes.c_int),
           ("libtorch_cpu.so", "mkl_set_num_threads_local", lambda n: ctypes.byref(ctypes.c_int(n))))


@functools.cache
def _setters() -> tuple:
    found = []
    for pattern, name, argument in SETTERS:
        for path in sorted((Path(torch.__file__).parent / "lib").glob(pattern)):
            try:
                setter = getattr(ctypes.CDLL(str(path)), name)
            except (OSError, AttributeError):
                continue
            found.append(lambda n, setter=setter, argument=argument: setter(argument(n)))
            break
    return tuple(found)


memo("runtime.thread_setters", _setters)


def single_core_here() -> bool:
    """Keep this thread's torch work on one core (no OpenMP team, no MKL threads); True when set. Other
    threads keep their counts, and so does a process's main thread (a test or a script running a page in it
    does its own work there)."""
    if threading.current_thread() is threading.main_thread():
        return False
    # torch sets a thread's OpenMP and MKL counts from its global one on the thread's first use of either;
    # asking for the count makes that happen now, so that it cannot undo what follows.
    torch.get_num_threads()
    setters = _setters()
    for setter in setters:
        setter(1)
    return bool(setters)
