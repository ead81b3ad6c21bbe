"""Run a function on N ranks of a gloo process group, from a test.

    from multirank import run_ranks
    results = run_ranks(fn, world_size=2, args=(...), timeout=60)   # [fn's result on rank 0, 1, ...]

How the ranks start. Forking the pytest process itself is unsafe: earlier tests ran
torch ops, which start OpenMP's thread pool, and a child forked after that can
deadlock in its first parallel op. So the ranks are forked by multiprocessing's
*forkserver*: a fresh interpreter (exec'd, not forked from pytest, so it is clean no
matter what the test process ran before) that imports torch and growkern once
(`set_forkserver_preload`) and runs no torch op; every rank is a fork of it, so a rank
starts in milliseconds with torch already imported. The server starts on the first
call (a few seconds: one torch import) and serves the whole test session.
Consequence: `fn` and `args` are pickled, so `fn` must be a module-level function
(of a test module or any importable module).

Rendezvous: the parent holds a TCPStore on 127.0.0.1 (port chosen by the kernel: no
free-port race) and every rank joins it as a client, then init_process_group("gloo").
Each rank runs in its own process group (setpgrp), sets torch to one thread, runs
fn(rank, world_size, *args), and sends back its pickled result or its exception with
the traceback. The parent waits with a hard deadline: when a rank fails (raises,
dies, or sends nothing) or the deadline passes, every rank's process group is killed
at once (the others are usually blocked in a collective with the dead one), and the
parent raises RankError naming the rank, with the rank's traceback in the message and
its exception chained when it unpickles.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp", "growkern",
           "growkern.train.loop", "growkern.growth.widen", "growkern.train.checkpoint", "transformers"]
_ctx = None


class RankError(RuntimeError):
    """A rank raised, died or timed out; the message holds its traceback."""


def _context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _rank_main(conn, fn, rank, world_size, port, args, kwargs, pg_timeout, threads):
    os.setpgrp()  # a process group of its own: the parent kills it and anything it started
    initialized = False
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(threads)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=timedelta(seconds=pg_timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout))
        initialized = True
        msg = ("ok", fn(rank, world_size, *args, **kwargs))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        # sent before the process group closes, so the parent hears the rank that failed
        # first before its peers fail in their collectives with it
        try:
            exc = pickle.dumps(e)
        except Exception:  # noqa: BLE001
            exc = None
        msg = ("error", (time.time(), traceback.format_exc(), exc))
    try:
        conn.send(msg)
    except Exception as e:  # noqa: BLE001 - an unpicklable result
        conn.send(("error", (time.time(), f"rank {rank}: its result could not be sent back: {e!r}\n", None)))
    conn.close()
    if initialized:
        import torch.distributed as dist
        dist.destroy_process_group()


def _kill(procs):
    for p in procs:
        if p.pid is not None and p.exitcode is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass  # not yet in its own group: kill the process itself
            p.kill()
    for p in procs:
        p.join(5)


def run_ranks(fn, world_size: int = 2, args=(), kwargs=None, *, timeout: float = 120.0,
              threads: int = 1) -> list:
    """fn(rank, world_size, *args, **kwargs) on `world_size` ranks of a gloo process
    group; returns the results in rank order. Raises RankError for the first rank that
    fails, after killing all of them; never takes longer than `timeout` seconds (plus
    the forkserver's start on the first call)."""
    import torch.distributed as dist
    ctx = _context()
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    procs, conns = [], []
    try:
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_rank_main, name=f"rank{rank}", daemon=True,
                            args=(send, fn, rank, world_size, store.port, args, kwargs or {},
                                  max(5.0, timeout), threads))
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
        deadline = time.monotonic() + timeout
        results = [None] * world_size
        pending = {c: r for r, c in enumerate(conns)}
        sentinels = {p.sentinel: r for r, p in enumerate(procs)}
        errors = []  # (time raised, rank, traceback, pickled exception)
        grace = None  # after the first error, a moment to hear the ranks that failed before it
        while pending:
            now = time.monotonic()
            if errors and now >= grace:
                break
            if now >= deadline:
                ranks = sorted(pending.values())
                raise RankError(f"rank(s) {ranks} of {world_size} did not finish within {timeout:g} s "
                                f"(killed)")
            until = min(deadline, grace) if errors else deadline
            live = [s for s, r in sentinels.items() if r in pending.values()]
            for obj in wait(list(pending) + live, until - now):
                if obj in pending:
                    rank = pending.pop(obj)
                    try:
                        status, payload = obj.recv()
                    except EOFError:
                        status, payload = "error", (time.time(), f"rank {rank} died without a result "
                                                    f"(exit code {procs[rank].exitcode})\n", None)
                    if status == "ok":
                        results[rank] = payload
                        continue
                    errors.append((payload[0], rank, payload[1], payload[2]))
                    grace = grace or time.monotonic() + 1.0
                elif obj in sentinels and sentinels[obj] in pending.values():
                    rank = sentinels[obj]
                    if conns[rank].poll(0):
                        continue  # its message is in the pipe: read next round
                    pending.pop(conns[rank])
                    errors.append((time.time(), rank, f"rank {rank} exited without a result "
                                   f"(exit code {procs[rank].exitcode})\n", None))
                    grace = grace or time.monotonic() + 1.0
        if errors:
            errors.sort()
            _, rank, tb, exc = errors[0]
            cause = None
            if exc is not None:
                try:
                    cause = pickle.loads(exc)
                except Exception:  # noqa: BLE001
                    cause = None
            others = [r for _, r, _, _ in errors[1:]]
            also = f" (then rank(s) {others} failed too)" if others else ""
            raise RankError(f"rank {rank} of {world_size} raised first{also}:\n{tb}") from cause
        for p in procs:
            p.join(10)
        return results
    finally:
        _kill(procs)
        for c in conns:
            c.close()
        del store


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for subprocesses such as torchrun)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

