"""Starting the processes of a run: several of them (torchrun / accelerate), or one that
DeepSpeed still treats as a process group."""

from __future__ import annotations

import os
import socket
import sys

from finetune.config import FinetuneConfig


def is_main_process() -> bool:
    """Rank 0 (or a run without a launcher): the process that speaks and writes for all."""
    return int(os.environ.get("RANK", "0")) == 0


def relaunch_command(argv: list[str], num_processes: int, cuda: bool) -> list[str]:
    """This same `finetune` command line on N processes: accelerate on GPUs, torchrun on CPU
    (accelerate starts several CPU processes only through MPI; torchrun needs nothing)."""
    args, skip = [], False
    for arg in argv:  # drop --num-processes N / --num-processes=N
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            args.append(arg)
    if cuda:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        command += ["--num_processes", str(num_processes)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run"]
        command += ["--nproc_per_node", str(num_processes)]
    return [*command, "-m", "finetune", *args]


def set_rendezvous_for_single_process(config: FinetuneConfig) -> None:
    """DeepSpeed wants a process group even alone; without a launcher, make a one-process one
    (else it asks for mpi4py)."""
    if not config.deepspeed or "RANK" in os.environ:
        return
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
