"""The process group of a run started by torchrun, and its collectives as one-line errors."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import QwenChatError

# A collective inside a model step waits at most this long for the other processes
# (QWEN3CHAT_DIST_TIMEOUT seconds): a process that hangs (rather than dies, which closes
# its connections at once) ends the run with an error then. Long enough for a first step
# that compiles the kernels.
STEP_TIMEOUT_S = 300.0
# Followers wait for process 0's next command as long as a user may think in the REPL.
IDLE_TIMEOUT = timedelta(days=7)


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size``; ``steps`` carries the
    model's collectives (all-reduces), ``commands`` process 0's commands, which followers
    may wait for without bound. Nothing else holds the two groups (see ``close``)."""

    rank: int
    size: int
    steps: object
    commands: object

    @property
    def driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes of ``tensor``, in place."""
        with collective_errors(self):
            dist.all_reduce(tensor, group=self.steps)
        return tensor

    def send(self, tensor: torch.Tensor, to: int) -> None:
        with collective_errors(self):
            dist.send(tensor, to, group=self.steps)

    def sending(self, tensor: torch.Tensor, to: int) -> dist.Work:
        """Start sending ``tensor`` (kept unchanged until ``wait`` is given the handle)."""
        with collective_errors(self):
            return dist.isend(tensor, to, group=self.steps)

    def wait(self, sends: list[dist.Work]) -> None:
        """Until the sends started are done."""
        with collective_errors(self):
            for send in sends:
                send.wait()

    def receive(self, tensor: torch.Tensor, source: int) -> torch.Tensor:
        """``source``'s tensor, received into ``tensor``."""
        with collective_errors(self):
            dist.recv(tensor, source, group=self.steps)
        return tensor

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every process's ``tensor`` (one shape on all) on process 0, in rank order; None
        on the others."""
        pieces = [torch.empty_like(tensor) for _ in range(self.size)] if self.driver else None
        with collective_errors(self):
            dist.gather(tensor, pieces, dst=0, group=self.steps)
        return pieces

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Process 0's CPU ``tensor`` on every process, in place, over the command group."""
        with collective_errors(self):
            dist.broadcast(tensor, src=0, group=self.commands)
        return tensor

    def close(self) -> None:
        """Destroy the process groups and let go of them, which ends their worker threads
        here, while Python runs. A worker lets go of a collective's tensors just after the
        collective returns, and that takes the GIL: at interpreter exit, where the groups
        used to be freed, a worker still doing so was ended mid-destructor and the process
        aborted ("terminate called without an active exception"; seen about once in ten
        pipeline-split servers stopping)."""
        if dist.is_initialized():
            dist.destroy_process_group()
        self.steps = self.commands = None  # freed with the GIL released: the threads join


class collective_errors:
    """A failed collective (a process died, hung past the timeout, or cannot be reached)
    as a QwenChatError naming this process: the CLI prints it on one line."""

    def __init__(self, world: World | None):
        self.rank = None if world is None else world.rank

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if error is None or not isinstance(error, RuntimeError | dist.DistError):
            return False
        raise QwenChatError(
            f"process {self.rank}: another process of the run stopped or cannot be reached "
            f"({_first_line(error)})"
        ) from None


def _first_line(error: Exception) -> str:
    """The first line of a collective's error (gloo's run to many) without the source
    location gloo puts first, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else type(error).__name__)
    return line[:160]


def join(device: torch.device) -> World | None:
    """The World of a process torchrun started (WORLD_SIZE > 1), the process group formed;
    None for a run of one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        raise QwenChatError(
            "WORLD_SIZE is set but RANK or MASTER_ADDR is not: start every process with torchrun"
        )
    given = os.environ.get("QWEN3CHAT_DIST_TIMEOUT", str(STEP_TIMEOUT_S))
    try:
        timeout = timedelta(seconds=float(given))
    except (ValueError, OverflowError):
        timeout = None
    if timeout is None or timeout.total_seconds() <= 0:
        raise QwenChatError(f"QWEN3CHAT_DIST_TIMEOUT={given!r}: expected a number of seconds > 0")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timeout)
        commands = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    except (RuntimeError, ValueError, dist.DistError) as e:
        raise QwenChatError(
            f"the processes of the run could not form a group ({_first_line(e)}); "
            "check torchrun's --rdzv-endpoint and that every host can reach it"
        ) from None
    return World(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, commands)
