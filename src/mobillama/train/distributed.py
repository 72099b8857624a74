"""Process groups and model wrapping: single process, DDP, or FSDP2, launched by ``torchrun``.

``torchrun`` (and therefore SLURM / multi-node launchers that call it) sets RANK, WORLD_SIZE, LOCAL_RANK
and MASTER_ADDR/PORT; :func:`init_distributed` reads them. Backend: NCCL on CUDA, gloo on CPU.

FSDP2 and the shared FFN. ``fully_shard`` is applied to every decoder layer (its attention and two
norms) and then to the root model. The FFN modules (``model.model.ffns``) are *not* inside any layer:
they belong to the root unit, together with the embeddings, final norm and LM head. The root unit's
parameters are all-gathered before the first layer runs and stay gathered through the whole forward,
and in backward its gradients are reduce-scattered only after the last layer's backward has added its
contribution. So every layer can reach the shared FFN, and its gradient is the sum over layers, the same
as in a single process (tests/train/test_distributed.py checks it against the single-process run). A
per-layer unit cannot hold it: it would be resharded after that layer and reduce-scattered once per
layer. Cost: the root unit (embeddings + head + shared FFN, ~165M params for the 0.5B) is unsharded for
the whole step.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mobillama.errors import MobiLlamaError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # none | ddp | fsdp2

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj):
        """rank 0's value of a picklable object on every rank (decisions such as which checkpoint to load)."""
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MobiLlamaError("recipe key 'train.device' is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(strategy: str = "auto", device: str = "auto") -> DistContext:
    """Join the process group torchrun set up (if any) and decide the strategy.

    ``auto`` is DDP when there is more than one process, else a single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world > 1 and strategy == "none":
        raise MobiLlamaError(f"launched with {world} processes but recipe key 'train.strategy' is 'none'")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, strategy=strategy)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The model to train: as is, under DDP, or with FSDP2 units (layers; root holds the FFNs)."""
    if ctx.strategy == "ddp" and ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if ctx.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        if not ctx.distributed:
            raise MobiLlamaError(
                "recipe key 'train.strategy' is 'fsdp2' but the run was not launched by torchrun"
            )
        decoder = model.model
        for layer in decoder.layers:
            fully_shard(layer)
        fully_shard(model)  # root unit: embeddings, the (shared) FFNs, final norm, LM head
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying MobiLlama (DDP keeps it in ``.module``; FSDP2 modifies the module in place)."""
    return getattr(model, "module", model)


def grad_sync(model: nn.Module, ctx: DistContext, sync: bool):
    """Context for one micro-batch: skip the gradient all-reduce / reduce-scatter except on the last one."""
    if ctx.strategy == "ddp" and ctx.distributed and not sync:
        return model.no_sync()
    if ctx.strategy == "fsdp2" and ctx.distributed:
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
        dist.destroy_process_group()
