"""Counting the work of a probe on any machine: aten ops, host syncs, dense solves, memory.

A probe's time on a GPU is set by the host when it issues many small ops and
reads values back between them (each read waits for the device), not by the
arithmetic. Both are visible on any device: :class:`OpCounter` is a
``TorchDispatchMode`` that counts every aten op dispatched inside it, the ops
that make the host wait for the device (``.item()``/``bool()``/``int()`` via
``aten._local_scalar_dense``, ``nonzero``, ``unique``, boolean-mask indexing,
``.tolist()`` and device-to-host copies) and the dense solves (eigh, svd, qr,
...). The counts are the same on CPU and CUDA: they come from the program.

Memory is counted the same way, from the program: every storage an op
allocates inside the ``with`` (views, transposes and in-place results share
their input's storage and are not allocations) is live from the op that made
it until the storage is freed, whoever holds it (autograd's saved tensors
included). :attr:`OpCounter.largest` is the largest such allocation and
:attr:`OpCounter.peak_bytes` the most bytes live at once, beyond what existed
before the ``with`` (a kernel's internal scratch is not seen).

>>> import torch
>>> with OpCounter() as counts:
...     x = torch.arange(6.0).reshape(2, 3)
...     _ = bool((x > 2).any()), x[x > 2], torch.linalg.eigvalsh(x @ x.T)
>>> counts.syncs, counts.solves
(2, 1)
>>> counts.sync_ops["_local_scalar_dense"], counts.sync_ops["index (boolean mask)"]
(1, 1)
>>> w = torch.zeros(1000, 10)
>>> with OpCounter() as counts:
...     _ = w.t()                  # a view: no allocation
...     y = (w + 1).sum()          # 40,000 bytes live, then freed; 4 bytes kept
>>> counts.largest[:2], counts.peak_bytes, counts.live_bytes
((10000, 40000), 40004, 4)
"""

from __future__ import annotations

import weakref
from collections import Counter
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# aten ops (by overload packet name) whose result size or value the host must read
_SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "argwhere",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "masked_select",
        "equal",
    }
)
# dense factorisations and eigensolvers
_SOLVE_OPS = frozenset(
    {
        "_linalg_eigh",
        "linalg_eigh",
        "linalg_eigvalsh",
        "_linalg_eigvals",
        "linalg_eig",
        "linalg_eigvals",
        "_linalg_svd",
        "linalg_svd",
        "linalg_svdvals",
        "svd",
        "linalg_qr",
        "geqrf",
        "linalg_cholesky_ex",
        "linalg_lu_factor_ex",
        "linalg_lu",
        "_linalg_solve_ex",
        "linalg_solve_triangular",
        "linalg_lstsq",
        "_linalg_det",
        "_linalg_slogdet",
    }
)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    """(device, address) of the storage behind ``tensor``; None for no (or an empty) storage."""
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta or other storage-less tensors
        return None
    if storage.nbytes() == 0 or storage.device.type == "meta":
        return None
    return (str(storage.device), storage.data_ptr())


def _boolean_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return isinstance(indices, list | tuple) and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
    )


class OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts aten ops, host syncs and dense solves dispatched inside the ``with``.

    Attributes:
        ops: every aten op.
        syncs: ops that make the host wait for the device (see the module).
        solves: dense factorisations and eigensolvers.
        by_op: every op by name; sync_ops and solve_ops by name.
        solve_shapes: the input shape of each solve, as ``(shape, dtype)``.
        largest: the largest storage an op allocated: ``(elements, bytes, "op shape
            dtype")`` (views and in-place results are not allocations).
        peak_bytes: the most bytes of storage allocated inside the ``with`` and live at
            once (freed when no tensor, autograd's saved ones included, holds it).
        live_bytes: those still live (at exit: what the code inside kept).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops = 0
        self.by_op: Counter[str] = Counter()
        self.sync_ops: Counter[str] = Counter()
        self.solve_ops: Counter[str] = Counter()
        self.solve_shapes: Counter[tuple[tuple[int, ...], str]] = Counter()
        self.largest: tuple[int, int, str] = (0, 0, "")
        self.peak_bytes = 0
        self.live_bytes = 0
        self._live: dict[tuple[str, int], int] = {}  # storage -> bytes
        self._tolist: Any = None

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())

    @property
    def solves(self) -> int:
        return sum(self.solve_ops.values())

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = func.overloadpacket.__name__
        self.ops += 1
        self.by_op[name] += 1
        if name in _SYNC_OPS:
            self.sync_ops[name] += 1
        elif name in ("index", "index_put", "index_put_") and _boolean_index(args):
            self.sync_ops[f"{name} (boolean mask)"] += 1
        elif name in ("_to_copy", "copy_"):
            source = args[1] if name == "copy_" else args[0]
            target = args[0].device if name == "copy_" else (kwargs or {}).get("device")
            if (
                isinstance(source, torch.Tensor)
                and source.device.type != "cpu"
                and target is not None
                and torch.device(target).type == "cpu"
            ):
                self.sync_ops["device-to-host copy"] += 1
        if name in _SOLVE_OPS:
            self.solve_ops[name] += 1
            first = args[0] if args else None
            if isinstance(first, torch.Tensor):
                self.solve_shapes[(tuple(first.shape), str(first.dtype))] += 1
        out = func(*args, **(kwargs or {}))
        self._allocated(name, out, args, kwargs)
        return out

    def _allocated(
        self, name: str, out: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None
    ) -> None:
        """Record the storages ``out`` holds that neither an input nor a live one had."""
        known: set[tuple[str, int]] | None = None
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = _storage_key(tensor)
            if key is None or key in self._live:
                continue
            if known is None:
                tensors = (t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
                known = {k for t in tensors if (k := _storage_key(t)) is not None}
            if key in known:  # a view or an in-place result of an input
                continue
            storage = tensor.untyped_storage()
            size = storage.nbytes()
            self._live[key] = size
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._freed, key)
            if size > self.largest[1]:
                elements = size // tensor.element_size()
                self.largest = (elements, size, f"{name} {tuple(tensor.shape)} {tensor.dtype}")

    def _freed(self, key: tuple[str, int]) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def __enter__(self) -> OpCounter:
        super().__enter__()  # type: ignore[no-untyped-call]
        counter = self
        original = torch.Tensor.tolist
        self._tolist = original

        def tolist(tensor: torch.Tensor) -> Any:  # reads every element on the host
            counter.sync_ops["tolist"] += 1
            return original(tensor)

        torch.Tensor.tolist = tolist  # type: ignore[method-assign,assignment]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(exc_type, exc, traceback)  # type: ignore[no-untyped-call]
