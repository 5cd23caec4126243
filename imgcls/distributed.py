"""The processes a run spans: rank and world size from torchrun, the process group, and the few
collectives the stages need (gathering a split's logits, summing over ranks, global BatchNorm).

`torchrun --nproc_per_node N -m imgcls.run EXP` starts N copies of the run; torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK) say which one this is. Without them a run is one process and
nothing here communicates. The backend is NCCL on CUDA and gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

from imgcls.errors import ConfigError, PeerLost

# A collective that waits this long means another rank died or hangs: the survivors fail instead
# of waiting forever (torchrun also stops them as soon as it sees one of its own workers exit).
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("IMGCLS_DIST_TIMEOUT", 120)))


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    local_rank: int = 0  # rank on this machine: local rank 0 builds the machine's decoded cache
    size: int = 1
    backend: Literal["none", "gloo", "nccl"] = "none"

    @property
    def is_main(self) -> bool:
        """The one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (a new tensor; in one process, t itself). Every rank gets the same
        sums, so decisions made on them (a NaN loss stops the run) are made alike everywhere."""
        if not self.distributed:
            return t
        out = t.detach().clone().to(self._device())
        dist.all_reduce(out)
        return out.to(t.device)

    def from_main(self, obj: Any) -> Any:
        """Rank 0's obj, on every rank (what the others pass is ignored)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def local_first(self) -> Iterator[None]:
        """Local rank 0 runs the block first, the machine's other ranks after it: they find what it built
        (the decoded cache, written atomically) instead of each building it again."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()


def from_env(device_type: str, env: dict[str, str] | None = None) -> World:
    """The world torchrun describes in the environment (one process when it describes none)."""
    env = dict(os.environ) if env is None else env
    size = int(env.get("WORLD_SIZE", 1))
    if size == 1:
        return World()
    backend = "nccl" if device_type == "cuda" else "gloo"
    return World(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), size, backend)


def setup(device: torch.device) -> World:
    """Join the process group torchrun set up the rendezvous for (one process: nothing to join)."""
    world = from_env(device.type)
    if not world.distributed or dist.is_initialized():
        return world
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(world.backend, timeout=TIMEOUT)
    return world


@contextlib.contextmanager
def peers_watched(world: World) -> Iterator[None]:
    """A collective that fails because a peer is gone (its connection reset, or TIMEOUT passed)
    becomes one clear message instead of a backend traceback from every survivor."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        text = str(e)
        if not world.distributed or not (isinstance(e, dist.DistError) or any(w in text for w in ("gloo", "NCCL", "Timed out"))):
            raise
        raise PeerLost(
            f"rank {world.rank}: another process of the run stopped or stopped answering "
            f"({text.splitlines()[0][-160:]}); every finished epoch is saved: continue with --resume"
        ) from None


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def device_of(device: torch.device, world: World) -> torch.device:
    """Each rank of a CUDA run takes the GPU of its local rank."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def check_batch(batch_size: int, world: World, key: str = "data.batch_size") -> None:
    if batch_size % world.size:
        raise ConfigError(
            "experiment",
            [f"{key} = {batch_size} is the global batch and must divide evenly over the {world.size} processes; "
             f"choose a multiple of {world.size}"],
        )


# ---------------------------------------------------------------------------------- BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks, differentiable: each rank's input touches every rank's output, so the
    gradient is the sum over ranks too."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t)


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on any backend
    (torch's SyncBatchNorm runs on GPUs only). Two differentiable all-reduces: the sums (the pixel
    count riding along as one more element), then the centred sums of squares, the same two passes
    a single process's BatchNorm makes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, 2, 3]
        count = torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])], dtype=x.dtype)
        sums = _all_sum(torch.cat([x.sum(dims), count]))  # differentiable collectives: the gradient crosses ranks too
        n = sums[-1:]
        mean = sums[:-1] / n
        centred = x - mean.view(1, -1, 1, 1)
        var = _all_sum(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)  # unbiased, as torch
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1) if self.affine else out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of the model made global: torch's SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere.
    Parameters and buffers are the same tensors, so a state dict is unchanged."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var, new.num_batches_tracked = (
                child.running_mean, child.running_var, child.num_batches_tracked,
            )
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model
