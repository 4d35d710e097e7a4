"""Running on several processes with torch.distributed, launched by ``torchrun``.

``torchrun --nproc-per-node N -m dfkd_deploy compress ...`` starts N copies of the CLI with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set; :func:`session` joins them into
a process group (NCCL on CUDA, one GPU per local rank; gloo on CPU). Nothing else is scheduled
here: torchrun (and its c10d rendezvous for several nodes) starts, watches and stops the
processes.

What each rank does (see ``Distiller`` and ``api.compress``):

- the recipe's batch sizes are totals over all ranks; each rank synthesizes
  ``synthesis.batch_size / world`` images per round with its own random streams
  (:func:`rank_seed`) into its own pool shards, and the generator's meta-gradients are averaged
  across ranks before every meta step, so the generator stays identical everywhere;
- KD runs under DistributedDataParallel: every step draws one global batch of indices from the
  union of all shards with a random stream all ranks share, and each rank trains on its slice;
- only rank 0 writes checkpoints, reports and exports (the others wait); a failure there is
  sent to every rank, so all of them stop with the same one-line error.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

from dfkd_deploy.core.errors import UsageError

T = TypeVar("T")

RANK_SEED_STRIDE = 1_000_033   # rank r's torch/python streams start at seed + r * stride
TIMEOUT_ENV = "DFKD_DEPLOY_DIST_TIMEOUT_MIN"   # how long ranks wait for each other (rank 0's export)
DEFAULT_TIMEOUT_MIN = 120


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a single process) ---------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """All-reduce the gradients in place to their mean over ranks (one flat buffer)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        start = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[start:start + n].view_as(g))
            start += n

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a few numbers over ranks (metrics, flags)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def broadcast_module(self, module: nn.Module) -> None:
        """Make every rank's parameters and buffers equal to rank 0's."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(t.data, src=0)

    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj`` (moved to CPU) on rank 0, in rank order; None on the others."""
        obj = to_cpu(obj)
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [to_cpu(obj) if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; every rank returns its result or raises its error.

        The other ranks wait meanwhile. An error on rank 0 (a full disk, say) is sent to them, so
        every process stops with the same one line instead of hanging in the next collective."""
        if not self.enabled:
            return fn()
        outcome: tuple[bool, Any] = (True, None)
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
                outcome = (False, _portable(exc))   # plain strings: nothing to unpickle but text
        ok, value = self.broadcast(outcome)
        if error is not None:
            raise error
        if not ok:
            raise _rebuilt(*value)
        return value


def _comm_device() -> torch.device:
    """Where small tensors for collectives live: NCCL only moves CUDA tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _portable(exc: BaseException) -> tuple[str, str]:
    """Rank 0's error as plain data (its class name and message) for the other ranks."""
    return type(exc).__name__, str(exc)


def _rebuilt(name: str, message: str) -> BaseException:
    """The error a rank re-raises: the same one-line error class of ours (so the exit code is the
    same on every rank), anything else as a RuntimeError naming its type."""
    from dfkd_deploy.core.errors import DfkdError

    pending, ours = [DfkdError], {}
    while pending:
        cls = pending.pop()
        ours[cls.__name__] = cls
        pending += cls.__subclasses__()
    cls = ours.get(name)
    return cls(message) if cls is not None else RuntimeError(f"{name}: {message}")


def to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def current() -> DistContext:
    """The running process group's view (a single process when none is initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                           int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())))
    return DistContext()


def process_started() -> float:
    """When this process started (time.time() scale): /proc on Linux, else now. A budget under
    torchrun counts from there, the interpreter's and torch's start-up included."""
    import time

    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])      # field 22: starttime, after comm
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
        return started if started <= time.time() else time.time()
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def session(device: torch.device) -> Iterator[tuple[DistContext, torch.device]]:
    """Join the process group torchrun described in the environment (if any) for the duration.

    Yields the context and this rank's device (``cuda:LOCAL_RANK`` on GPUs). In a single process,
    or when the caller already initialised torch.distributed, it changes nothing."""
    if not launched_by_torchrun() or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield current(), device
        return
    if not torch.distributed.is_available():
        raise UsageError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UsageError(f"WORLD_SIZE is set but {var} is not: start distributed runs with torchrun "
                             "(see docs/scale-out.md)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                             "use --nproc-per-node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
    torch.distributed.init_process_group(backend, timeout=timedelta(minutes=minutes))
    try:
        yield current(), device
    finally:
        torch.distributed.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the recipe's seed (a one-process run is unchanged); others get distinct streams."""
    return seed + rank * RANK_SEED_STRIDE


def per_rank(total: int, ctx: DistContext, what: str) -> int:
    if total % ctx.world_size:
        raise UsageError(f"{what}={total} does not split evenly over {ctx.world_size} processes; "
                         f"use a multiple of {ctx.world_size} (recipe batch sizes are totals over all ranks)")
    return total // ctx.world_size


def rank_recipe(recipe, ctx: DistContext):
    """The recipe one rank's synthesizer works with: its share of each synthesis round."""
    if not ctx.enabled:
        return recipe
    share = per_rank(recipe.synthesis.batch_size, ctx, "synthesis.batch_size")
    if share < 2:
        raise UsageError(f"synthesis.batch_size={recipe.synthesis.batch_size} leaves fewer than 2 images per "
                         f"process with {ctx.world_size} processes (BN statistics need 2)")
    local = recipe.model_copy(deep=True)
    local.synthesis.batch_size = share
    return local
