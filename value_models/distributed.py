"""Process group, device and parallel wrapping shared by the trainers (value model, A*-PO).

One process or `torchrun`: RANK / WORLD_SIZE / LOCAL_RANK come from the environment; NCCL on
GPU, gloo on CPU. FSDP needs a process group even with one process, so a single `python -m`
run with `--fsdp` creates a 1-process group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    @property
    def local_world(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))


def pin_local_device() -> None:
    """Under torchrun on GPUs, give each rank one visible GPU before CUDA starts, so a trainer
    and the vLLM engine it spawns use the same device (cuda:0 of that rank)."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else None
    if devices is not None and len(devices) == 1:
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local)] if devices else str(local)


def setup_distributed(fsdp: bool) -> Dist:
    """The process group (when torchrun started several processes, or for FSDP) and this
    rank's device: cuda:LOCAL_RANK, or cuda:0 when `pin_local_device` left one GPU visible."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 or fsdp:
        if "MASTER_ADDR" not in os.environ:  # single process with --fsdp
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world,
                                device_id=device if cuda else None)
    if not cuda and world > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank, world, local, device)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier(d: Dist) -> None:
    import torch.distributed as dist

    if d.enabled:
        dist.barrier()


def all_sum(d: Dist, values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(d: Dist, obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def use_bf16(dtype: str, d: Dist) -> bool:
    """`--dtype auto` is bf16 autocast on GPU and fp32 on CPU."""
    return dtype == "bf16" or (dtype == "auto" and d.device.type == "cuda")


def autocast(dtype: str, d: Dist):
    import torch

    if use_bf16(dtype, d):
        return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fully_shard_layers(module, layers, dtype: str, d: Dist):
    """FSDP2: shard every decoder layer, then the root (embeddings, final norm, head); with
    bf16, parameters are gathered in bf16 and gradients reduced in fp32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_bf16(dtype, d)
          else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def ddp(module, d: Dist):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def sync_context(model, fsdp: bool, sync: bool):
    """Gradient synchronisation only on the last micro-batch of an optimizer step."""
    if fsdp:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()
