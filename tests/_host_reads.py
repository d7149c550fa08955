"""Find, on the CPU, where code would wait for a GPU: the reads of device values on the host.

:class:`DeviceValueReads` is a ``TorchFunctionMode`` that treats the tensors it is told about (the inputs, the
parameters) as living on an accelerator: every tensor computed from them is one too, and every operation that
needs such a tensor's values on the host (``bool``, ``item``, ``tolist``, ``int``, ``float``, ``.cpu()``,
``.numpy()``, ``nonzero``, boolean-mask indexing, ...) is recorded with the innermost pycoe frame that asked for
it. On a CUDA device each of them is a synchronisation (the host waits for the queued kernels).

Inside a custom operator's implementation (the balanced-transport solver's) torch function modes are not active:
the operator's own copy to the host is tested separately.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# Tensor methods whose result is on the host (the value, or a host copy).
TO_HOST = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu"}
# Operations that stay on the device but need a value on the host first (the size of their result).
SIZED_BY_VALUES = {"nonzero", "unique", "masked_select", "bincount", "repeat_interleave"}
HOST_READS = TO_HOST | SIZED_BY_VALUES


@dataclass(frozen=True)
class Read:
    op: str
    where: str  # "path/inside/pycoe.py:line function" of the innermost pycoe frame
    caller: str  # the same for the innermost pycoe frame outside the argument checks (pycoe/_validation.py)


def _frame(frames: list[traceback.FrameSummary]) -> str:
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename.split('/pycoe/')[-1]}:{f.lineno} {f.name}"


class DeviceValueReads(TorchFunctionMode):
    """Record the host reads of values derived from ``device_tensors`` (see the module docstring)."""

    def __init__(self, device_tensors: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self._on_device: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for t in device_tensors:
            self.mark(t)
        self.reads: list[Read] = []

    def mark(self, t: torch.Tensor) -> None:
        self._on_device[t] = True

    def unmark(self, t: torch.Tensor) -> None:
        self._on_device.pop(t, None)

    @staticmethod
    def _to_host(name: str, args: tuple, kwargs: dict) -> bool:
        if name in TO_HOST:
            return True
        if name == "to":  # .to("cpu") / .to(torch.device("cpu")) / .to(device="cpu")
            targets = [*args[1:], kwargs.get("device")]
            return any(str(a).startswith("cpu") for a in targets if isinstance(a, (str, torch.device)))
        return False

    def _is_read(self, name: str, args: tuple, kwargs: dict, on_device: list[torch.Tensor]) -> bool:
        if name in SIZED_BY_VALUES or self._to_host(name, args, kwargs):
            return bool(on_device)
        if name == "__getitem__" and len(args) > 1:  # boolean-mask indexing: the result's size needs the mask
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            masks = [i for i in index if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
            return any(m in self._on_device for m in masks)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        flat, _ = tree_flatten((args, kwargs))
        on_device = [t for t in flat if isinstance(t, torch.Tensor) and t in self._on_device]
        read = self._is_read(name, args, kwargs, on_device)
        if read:
            frames = [f for f in traceback.extract_stack()[:-1] if "/pycoe/" in f.filename]
            outside = [f for f in frames if not f.filename.endswith("/pycoe/_validation.py")]
            self.reads.append(Read(name, _frame(frames), _frame(outside)))
        out = func(*args, **kwargs)
        if on_device and not self._to_host(name, args, kwargs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.mark(t)
        return out
