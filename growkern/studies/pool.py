"""Run a study's independent units (continuations, grown runs) on several CPU cores.

Each unit is a top-level function call `fn(*args)` that reads what it needs from disk
(a base checkpoint, the tokenized corpus) and returns a JSON-able result. With one
worker the units run in this process, one after the other; with more, in that many
spawned processes (spawn, not fork: the parent has run torch ops, and forking then can
deadlock OpenMP in the children), each with `threads` torch threads. Every unit is
deterministic given its arguments and thread count, so results do not depend on the
number of workers or on the order in which units finish.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterable

import torch


def default_workers(device: torch.device) -> int:
    """All cores on a CPU (one thread each), one process on a GPU."""
    return 1 if device.type != "cpu" else max(1, os.cpu_count() or 1)


def _init_worker(threads: int, parent: int) -> None:
    torch.set_num_threads(threads)
    try:  # Linux: end with the study process, not after the unit it was running
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the study died while this worker was starting, before the line above
        os._exit(1)


def run_units(units: Iterable[tuple], fn: Callable, *, workers: int = 1, threads: int = 1,
              on_start: Callable | None = None, on_result: Callable | None = None) -> None:
    """Call fn(*args) for each (key, args) in units; on_result(key, result) runs in this
    process as each finishes (in completion order), so a caller can store it at once and
    an interrupted study keeps every finished unit. on_start(key) runs as each is started."""
    units = list(units)
    if workers <= 1 or len(units) <= 1:
        for key, args in units:
            if on_start:
                on_start(key)
            result = fn(*args)
            if on_result:
                on_result(key, result)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(units)), mp_context=ctx,
                             initializer=_init_worker, initargs=(threads, os.getpid())) as pool:
        pending = {}
        todo = iter(units)

        def submit_next() -> bool:
            for key, args in todo:
                if on_start:
                    on_start(key)
                pending[pool.submit(fn, *args)] = key
                return True
            return False

        for _ in range(min(workers, len(units))):
            submit_next()
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    key = pending.pop(fut)
                    result = fut.result()  # a failed unit stops the study with its error
                    if on_result:
                        on_result(key, result)
                    submit_next()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
