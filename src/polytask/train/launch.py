"""Running ``polytask run`` on several processes: launching torchrun, and the process group
inside each of its workers."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

import torch
import torch.distributed as dist

__all__ = ["exit_worker", "launch_torchrun", "torchrun_process_group", "without_nproc"]


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` / ``--nproc=N``."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def launch_torchrun(argv: Sequence[str], nproc: int) -> int:
    """Run ``polytask ARGV`` (less ``--nproc``) as ``nproc`` torchrun workers on this
    machine; returns torchrun's exit code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "polytask",
        *without_nproc(argv),
    ]
    return subprocess.call(command)


@contextlib.contextmanager
def torchrun_process_group(device: str) -> Iterator[tuple[int, str]]:
    """Inside a torchrun worker: the process group (NCCL on CUDA, gloo on CPU) and this
    worker's device (``cuda`` becomes ``cuda:LOCAL_RANK``); yields (rank, device)."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(device).type == "cuda":
        if torch.device(device).index is not None:
            raise ValueError(
                f"--device {device} names one GPU for every process; give --device cuda "
                "(each process takes the GPU of its local rank)"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    try:
        yield dist.get_rank(), device
        # Every rank done with its collectives before the group goes: tearing gloo down
        # under a peer still using it aborts the process.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a worker process whose process group is destroyed, without the interpreter's
    shutdown.

    ``destroy_process_group`` does not stop gloo's worker threads while anything else holds
    the group, and once ``torch.distributed.fsdp`` is imported (DDP and polytask import it)
    torch itself keeps references to it (measured on torch 2.13). Such a thread may still
    hold the last collective's tensors. Releasing them
    during the interpreter's shutdown needs the GIL, which a finalizing interpreter no longer
    hands out: the process aborts ("terminate called without an active exception") after a
    successful run, about 1 run in 30 of the two-rank tests here, and torchrun reports the
    job failed. Everything is written by now (the results store closes its connection after
    each write, the streams and logs are flushed here), so the worker leaves at once.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
