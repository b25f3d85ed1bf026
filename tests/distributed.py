"""Multi-process tests on CPU: ``gloo`` ranks spawned on 127.0.0.1, each run bounded in time.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` fresh processes (spawn: no state forked from the
test session), initializes the default process group in each, calls ``fn(rank, world_size, *args)`` (a
module-level function, so a child can import it) and returns the list of what each rank returned, in rank
order. A rank that raises, or a run that outlives ``timeout``, fails the test with every rank's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, out_dir, fn, args):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears down: rank 0 hosts the store, and a gloo rank that destroyed its group
        # while a peer's last collective was still in flight aborted ("terminate called without an active
        # exception", exit -6) under load in CI.
        dist.barrier()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [
            context.Process(target=_rank_main, args=(rank, world_size, port, out_dir, fn, args))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = []
        for rank in range(world_size):
            err = os.path.join(out_dir, f"rank{rank}.err")
            if os.path.exists(err):
                errors.append(f"--- rank {rank}:\n{open(err).read()}")
        if hung or errors or any(p.exitcode != 0 for p in procs):
            hung_text = f"ranks {hung} still running after {timeout} s (killed); " if hung else ""
            raise AssertionError(
                f"{world_size} ranks: {hung_text}exit codes {[p.exitcode for p in procs]}\n" + "\n".join(errors)
            )
        return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]
