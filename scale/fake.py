"""Run the project's GPU code paths without a GPU: fake tensors, a fake process group, measured memory.

torch's `FakeTensorMode` gives every tensor a shape, a dtype and a device but no data: ops check devices
and dtypes exactly as on a GPU (a CPU tensor meeting a cuda tensor raises) and compute nothing, so the
20B transformer runs a training step in seconds on a laptop. This module adds what the project needs on
top of it:

  * `MeasuredFakeMode`: a FakeTensorMode that counts the bytes of every storage it creates and frees, so
    a step's PEAK memory at the real configs is measured, not estimated by hand (scale/estimate.py);
  * `cuda_autocast()`: lets `torch.autocast("cuda")` switch on for fake cuda tensors on a machine without
    CUDA (torch disables it there with a warning, which would hide dtype bugs);
  * `fake_copy(module, device)`: a real module's parameters and buffers become fake tensors on `device`
    (the tiny preset is built for real, then moved to a fake GPU);
  * `fake_process_group(world)`: a process group of `world` ranks inside ONE process (torch's test
    FakeProcessGroup: collectives return at once), registered for ONE device type, as NCCL's is for
    "cuda": a collective on a CPU tensor then fails with NCCL's own error.

Host work stays real: an op that reads only real CPU tensors (group statistics of the rewards, the sigma
grid) runs for real, as it does next to a GPU, so Python branches on host values work. Two limits, both of
the fake machinery rather than of the code under test: a backward pass on fake **cuda** tensors needs a real
CUDA device (the autograd engine asks the driver for the device's context), so device checks go through
the forward pass and the loss, and memory is measured on fake **cpu** tensors (bytes do not depend on the
device type); and a branch on a value computed on the GPU (`if loss.isnan():`) cannot be evaluated.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

GB = 1e9


class MeasuredFakeMode(FakeTensorMode):
    """FakeTensorMode that keeps `live` and `peak` bytes of the storages created under it.

    Every op's outputs are counted once per storage (views share it) at the storage's size, and subtracted
    when the storage is garbage-collected; FSDP2's in-place storage resizes (it frees an unsharded weight
    by resizing its storage to 0) are followed by `track_fsdp_storage_resizes`. Tensors made before the
    mode existed (real inputs) are not counted; call `track` for tensors made elsewhere that should be.
    """

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.live = 0
        self.peak = 0
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [bytes counted]

    def track(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage (once)."""
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        size = [storage.nbytes()]
        self._sizes[storage] = size
        self._add(size[0])
        weakref.finalize(storage, self._release, size)

    def resized(self, storage: torch.UntypedStorage, nbytes: int) -> None:
        """`storage` now holds `nbytes` (an in-place resize)."""
        size = self._sizes.get(storage)
        if size is not None:
            self._add(nbytes - size[0])
            size[0] = nbytes

    def reset_peak(self) -> None:
        """Start a new measurement: the peak is the live bytes now."""
        self.peak = self.live

    def _add(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def _release(self, size: list[int]) -> None:
        self.live -= size[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if host_only(args, kwargs):  # host work on real host tensors (rewards, sigmas) runs for real, as on a GPU box
            with unset_fake_temporarily():
                return func(*args, **(kwargs or {}))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not hasattr(t, "to_local"):  # DTensors wrap a counted local tensor
                self.track(t)
        return out


def host_only(args, kwargs) -> bool:
    """True when an op reads only real CPU tensors and makes none elsewhere: the host side of a GPU program (group
    statistics of the rewards, the sigma grid), which must run for real (its values decide Python branches)."""
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors or any(isinstance(t, FakeTensor) or t.device.type != "cpu" for t in tensors):
        return False
    device = (kwargs or {}).get("device")
    return device is None or torch.device(device).type == "cpu"


@contextlib.contextmanager
def track_fsdp_storage_resizes(mode: MeasuredFakeMode):
    """Follow FSDP2's `alloc_storage` / `free_storage` (in-place storage resizes) in `mode`'s counts."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    saved = (_fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage)

    def alloc(tensor: torch.Tensor) -> None:
        saved[0](tensor)
        mode.resized(tensor.untyped_storage(), tensor.untyped_storage().nbytes())

    def free(tensor: torch.Tensor) -> None:
        saved[1](tensor)
        mode.resized(tensor.untyped_storage(), 0)

    _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = alloc, free, alloc
    try:
        yield mode
    finally:
        _fsdp_param.alloc_storage, _fsdp_param.free_storage, _fsdp_param_group.alloc_storage = saved


@contextlib.contextmanager
def cuda_autocast():
    """Let `torch.autocast("cuda", dtype=torch.bfloat16)` turn on without a CUDA driver (fake cuda tensors).

    torch.autocast asks the driver whether AMP and bf16 exist and otherwise disables itself with a warning;
    on a fake GPU the answer must be the real GPU's: yes."""
    import torch.cuda.amp.common as amp_common

    saved = (amp_common.amp_definitely_not_available, torch.cuda.is_bf16_supported)
    amp_common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: True
    try:
        yield
    finally:
        amp_common.amp_definitely_not_available, torch.cuda.is_bf16_supported = saved


@contextlib.contextmanager
def module_moves():
    """Let `module.to(...)` move fake parameters (peft moves each new adapter to its layer's device and dtype).

    nn.Module.to swaps parameter objects with `torch.utils.swap_tensors`, which refuses fake Parameters
    (they carry weak references); there, the new value is set through `.data` instead."""
    saved = torch.utils.swap_tensors

    def swap_or_set(t1: torch.Tensor, t2: torch.Tensor) -> None:
        try:
            saved(t1, t2)
        except RuntimeError:
            with torch.no_grad():
                t1.data = t2.data
            if hasattr(t2, "fake_device"):
                t1.fake_device = t2.fake_device  # .data= leaves a FakeTensor's device attribute behind

    torch.utils.swap_tensors = swap_or_set
    try:
        yield
    finally:
        torch.utils.swap_tensors = saved


def fake_copy(module: torch.nn.Module, mode: FakeTensorMode, device: str | torch.device = "cuda",
              dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Replace `module`'s parameters and buffers, in place, by fake tensors on `device` (and `dtype` for the
    floating ones) with the same shapes and requires_grad. Returns `module`."""
    device = torch.device(device)
    with torch.no_grad(), mode:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    value = mode.from_tensor(p.detach()).to(device)
                    if dtype is not None and value.is_floating_point():
                        value = value.to(dtype)
                    sub._parameters[name] = torch.nn.Parameter(value, requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    value = mode.from_tensor(b).to(device)
                    if dtype is not None and value.is_floating_point():
                        value = value.to(dtype)
                    sub._buffers[name] = value
    return module


def fake_process_group(world_size: int, device_type: str = "cuda") -> None:
    """Initialise a process group of `world_size` ranks inside this one process (this is rank 0), whose
    backend serves `device_type` tensors only, as NCCL's serves "cuda" only. Collectives return at once
    without data (torch's FakeProcessGroup); one on a tensor of another device type raises NCCL's error
    ("No backend type associated with device type cpu"). `dist.destroy_process_group()` ends it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group(f"{device_type}:fake", store=FakeStore(), rank=0, world_size=world_size)
