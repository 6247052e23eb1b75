"""Staging trained weights for a running vLLM engine (RL weight sync, `PolicyEngine.update_weights`).

vLLM 0.32 reloads weights in place from a checkpoint directory through its worker RPC
(`collective_rpc("reload_weights", weights_path=...)`). The trainer therefore writes the new
weights as safetensors files into a staging directory (by default `/dev/shm`, i.e. memory)
and the workers read them back. Three things make that cheap and safe at 1.5B+ scale:

- the files hold the engine's dtype (bf16 on GPU), not the trainer's fp32 master weights:
  half the bytes to write and to hold in `/dev/shm` (3.1 GB instead of 6.2 GB for 1.5B);
- a tied LM head (Qwen2.5-1.5B/3B tie it to the input embedding) is left out: safetensors
  refuses two names of one storage, and vLLM's Qwen2 loader skips `lm_head.weight` of a tied
  model anyway;
- the space is checked before anything is written (`check_staging_space`), with one error
  naming what is needed and what the directory has, instead of a bus error or ENOSPC halfway
  through a step.

vLLM 0.32 also ships in-memory weight transfer (`AsyncLLM.init_weight_transfer_engine` /
`update_weights` with the "nccl" and "ipc" backends of `vllm.distributed.weight_transfer`);
both move CUDA tensors only, so they cannot run (or be tested) on CPU; see docs/training.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterable

from vgs.errors import VGSError

GIB = 1 << 30
BUCKET_BYTES = 1 << 30  # safetensors file size per bucket
DEFAULT_STAGING = "/dev/shm"


def staging_root(staging_dir: str | None = None) -> str:
    """Where staged weights go: `staging_dir`, else `/dev/shm` when writable, else the temp dir."""
    if staging_dir:
        return staging_dir
    return DEFAULT_STAGING if os.access(DEFAULT_STAGING, os.W_OK) else tempfile.gettempdir()


def free_bytes(path: str) -> int:
    return int(shutil.disk_usage(path).free)


def check_staging_space(root: str, need: int, what: str = "weight sync") -> None:
    """Refuse, with one line, when `root` has less free space than `need` bytes."""
    if not os.path.isdir(root):
        raise VGSError(f"{what}: staging directory {root!r} does not exist")
    have = free_bytes(root)
    if have < need:
        raise VGSError(f"{what} needs {need / GIB:.2f} GiB free in {root} (the policy's weights in the engine's dtype); "
                       f"{root} has {have / GIB:.2f} GiB free. Enlarge it (docker/podman: --shm-size; Kubernetes: "
                       f"an emptyDir with medium Memory) or point the sync elsewhere (--sync-dir)")


def dtype_bytes(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def staged_bytes(named_shapes: Iterable[tuple[str, Any]], dtype: Any, skip: Iterable[str] = ()) -> int:
    """Bytes `write_weights` writes for (name, tensor or shape) pairs in `dtype`: what a sync
    needs in the staging directory, known before the first step."""
    import torch

    skip = set(skip)
    total = 0
    for name, t in named_shapes:
        if name in skip:
            continue
        if isinstance(t, torch.Tensor):
            size = dtype_bytes(dtype) if t.is_floating_point() else t.element_size()
            total += t.numel() * size
        else:
            total += int(torch.Size(t).numel()) * dtype_bytes(dtype)
    return total


def write_weights(weights: Iterable[tuple[str, Any]], path: str, dtype: Any = None, skip: Iterable[str] = (),
                  bucket_bytes: int = BUCKET_BYTES) -> int:
    """Write (name, tensor) pairs as `model-NNNNN.safetensors` files into `path`, floating-point
    tensors cast to `dtype` (None: as they are), names in `skip` left out (a tied LM head).
    `weights` may be a generator that gathers one tensor at a time (FSDP): only the current
    bucket is held on the host. The free space is checked before each file. Returns the bytes
    written."""
    from safetensors.torch import save_file

    skip = set(skip)
    bucket: dict[str, Any] = {}
    size = files = total = 0

    def flush() -> None:
        nonlocal bucket, size, files, total
        if bucket:
            check_staging_space(path, size)
            save_file(bucket, os.path.join(path, f"model-{files:05d}.safetensors"))
            files += 1
            total += size
        bucket, size = {}, 0

    for name, t in weights:
        if name in skip:
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # on the trainer's device first: the copy to host moves the smaller tensor
        elif t.device.type == "cpu":
            t = t.clone()  # never alias the caller's tensor (two names of one storage, a live parameter)
        t = t.to("cpu").contiguous()
        bucket[name] = t
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            flush()
    flush()
    if not files:
        raise VGSError("update_weights got no tensors")
    return total


class WeightSyncWorkerExtension:
    """Mixed into every vLLM worker (`EngineArgs.worker_extension_cls`, set by `PolicyEngine`),
    callable by name through `collective_rpc`.

    Why: after vLLM 0.32's in-place `reload_weights` of a tied model (`lm_head.weight` is
    skipped on load), the LM head still computes with the old weights while the input
    embedding has the new ones (measured on a tiny tied model: log-probs off by ~1 nat, equal
    to 1e-6 to a model with the new embedding and the old head). On CPU the head's gemm weight
    is also pre-packed after loading. Re-tying the head to the embedding and re-running its
    post-load processing after each reload restores the model vLLM built."""

    def vgs_retie_word_embeddings(self) -> bool:
        model = self.get_model()
        if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            return False
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is None or embed is None or not hasattr(lm_head, "tie_weights"):
            return False
        model.lm_head = lm_head = lm_head.tie_weights(embed)
        method = getattr(lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(lm_head)  # CPU: re-pack the head's gemm weight
        return True
