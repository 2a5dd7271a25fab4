"""The two collectives synchronized batch norm needs (allgather, allreduce-sum of float64
vectors), over each distributed engine it runs on: one small adapter per engine, all here.
Adapters import their engine lazily: `import batchnorm` never imports mpi4py or torch."""
from __future__ import annotations

import copy
import sys
from typing import Any, Optional

import numpy as np


class Engine:
    """A group of processes: `rank`, `size`, and the collectives on host float64 vectors.
    `device` (a torch device, or None) says where the engine wants its buffers."""

    rank: int
    size: int

    def current(self) -> bool:
        """Whether this engine still stands for the group it was built for (torch's default
        group can be destroyed and made again, with another size)."""
        return True

    def allgather(self, buf: np.ndarray, device: Any = None) -> np.ndarray:
        """Every rank's `buf` (1-D float64, the same length on every rank) as rows of a
        (size, len) array, in rank order."""
        raise NotImplementedError

    def allreduce(self, buf: np.ndarray, device: Any = None) -> np.ndarray:
        """The element-wise sum of every rank's `buf` (1-D float64)."""
        raise NotImplementedError


class MpiEngine(Engine):
    """An mpi4py communicator; buffers travel from host memory (MPI_Allgather, MPI_Allreduce)."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        if comm == MPI.COMM_NULL:  # (mpi4py's MPI_ERR_COMM said nothing of why)
            raise ValueError("group must be a communicator that holds this rank, got MPI.COMM_NULL (what Split "
                             "gives the ranks it leaves out): call the synchronized layer on its members only")
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allgather(self, buf: np.ndarray, device: Any = None) -> np.ndarray:
        out = np.empty((self.size, buf.size), np.float64)
        self.comm.Allgather(np.ascontiguousarray(buf, np.float64), out)
        return out

    def allreduce(self, buf: np.ndarray, device: Any = None) -> np.ndarray:
        from mpi4py import MPI

        out = np.empty_like(buf, np.float64)
        self.comm.Allreduce(np.ascontiguousarray(buf, np.float64), out, op=MPI.SUM)
        return out


class TorchEngine(Engine):
    """A torch.distributed process group (None: the default group). gloo takes the buffers on
    the CPU; NCCL, which only takes GPU tensors, on `device` (the input's) or the current
    CUDA device."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "group must be an mpi4py communicator or a torch.distributed process group, got None "
                "and torch.distributed is not initialized (call torch.distributed.init_process_group first)"
            )
        self.dist = dist
        self.group = group
        self._world = dist.group.WORLD if group is None else None  # the default group it resolved to
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._needs_cuda = str(dist.get_backend(group)).lower() == "nccl"

    def current(self) -> bool:
        return self.group is not None or (self.dist.is_initialized() and self.dist.group.WORLD is self._world)

    def _tensor(self, buf: np.ndarray, device: Any) -> Any:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(buf, np.float64))
        if not self._needs_cuda:
            return t  # gloo and MPI backends take host tensors
        if device is None or torch.device(device).type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return t.to(device)

    def allgather(self, buf: np.ndarray, device: Any = None) -> np.ndarray:
        import torch

        send = self._tensor(buf, device)
        out = torch.empty(self.size * send.numel(), dtype=send.dtype, device=send.device)  # gloo wants it flat
        # all_gather_single is torch >= 2.10's name of all_gather_into_tensor.
        gather = getattr(self.dist, "all_gather_single", None) or self.dist.all_gather_into_tensor
        gather(out, send, group=self.group)
        return out.cpu().numpy().reshape(self.size, -1)

    def allreduce(self, buf: np.ndarray, device: Any = None) -> np.ndarray:
        t = self._tensor(buf, device).clone()  # summed in place; never the caller's memory
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy()


def copy_sharing_group(layer: Any, group: Any, memo: dict) -> Any:
    """deepcopy of a synchronized layer (either library's SyncBatchNorm): its group is a handle
    to the process's communicator, not data, so the copy shares it (neither a ProcessGroup nor
    an mpi4py communicator can be copied); the layer's __getstate__ leaves its engine out."""
    if group is not None:
        memo[id(group)] = group
    new = layer.__class__.__new__(layer.__class__)
    memo[id(layer)] = new
    new.__setstate__(copy.deepcopy(layer.__getstate__(), memo))
    return new


def check_group(group: Optional[Any]) -> str:
    """The engine of `group` ("mpi" or "torch") from its type alone, importing nothing."""
    module = type(group).__module__ if group is not None else "torch"
    dist = sys.modules.get("torch.distributed")
    if type(group) is int and dist is not None and group == getattr(dist.GroupMember, "NON_GROUP_MEMBER", None):
        raise ValueError("group must be a process group that holds this rank, got GroupMember.NON_GROUP_MEMBER "
                         "(what torch.distributed.new_group gives the ranks it leaves out): call the synchronized "
                         "layer on its members only (batchnorm.torch.SyncBatchNorm runs plain batch norm there)")
    if module.startswith("mpi4py") and hasattr(group, "Allgather"):
        return "mpi"
    if module.startswith("torch"):
        return "torch"
    raise TypeError(
        "group must be an mpi4py communicator (mpi4py.MPI.Comm) or a torch.distributed process group "
        f"(None: torch's default group), got {type(group).__name__}"
    )


def engine_for(group: Optional[Any]) -> Engine:
    """The adapter of `group`: an mpi4py communicator, a torch.distributed process group, or
    None for torch's default group. Decided by the object's type alone (the same on every
    rank), so a bad group fails on every rank before any collective."""
    if check_group(group) == "mpi":
        return MpiEngine(group)
    import torch.distributed as dist

    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    return TorchEngine(group)
