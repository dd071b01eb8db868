"""What a probe leaves behind on a sharded model: nothing.

(Belongs with the probe: ``inversion_monitor.probe.sharding`` after the layout move.)

The probe runs the model's own forward and a partial backward, so FSDP2 and
DeepSpeed ZeRO-3 gather parameters block by block through their own hooks,
exactly as in training, and release them the same way. One thing differs:
ZeRO-3 prefetches parameters in the order it recorded for the training step,
and a probe's backward stops at the lowest probed block, so blocks it
prefetched for a backward that never comes stay gathered. :func:`probe_leaves_shards`
releases exactly those afterwards, the way ``deepspeed.zero.GatheredParameters``
does on exit (waiting on any gather still in flight, then ``partition``), after
closing, as DeepSpeed does at the end of each backward, the modules whose
backward started but never finished (their parameters stay marked in use).
Parameters gathered before the probe, and persistent ones, are left alone.
ZeRO-3 also records the order in which modules fetch parameters, from one
forward of the model to the next, and schedules the following steps by it;
a probe that starts while no order is recorded (as after TRL's generation)
would have its own forward and partial backward recorded as the training
step's order, and the next backward would find parameters released too early.
So a recording the probe started is dropped on exit: DeepSpeed records again
from the next real step.

>>> import torch
>>> with probe_leaves_shards(torch.nn.Linear(2, 2)):   # not sharded: nothing to do
...     pass
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


def sharded_parameters(model: nn.Module) -> bool:
    """Whether any parameter is an FSDP2 DTensor or a DeepSpeed ZeRO-3 partition.

    >>> sharded_parameters(nn.Linear(2, 2))
    False
    """
    return any(
        hasattr(p, "ds_id") or type(p).__name__ == "DTensor" or hasattr(p, "_local_tensor")
        for p in model.parameters()
    )


def _status(param: Any) -> str | None:
    status = getattr(param, "ds_status", None)
    return None if status is None else str(getattr(status, "name", status))


@contextmanager
def probe_leaves_shards(model: nn.Module) -> Iterator[None]:
    """Release, on exit, the ZeRO-3 parameters gathered inside and still gathered."""
    zero_params = [p for p in model.parameters() if hasattr(p, "ds_status")]
    before = {id(p) for p in zero_params if _status(p) != "NOT_AVAILABLE"}
    coordinator = _zero3_coordinator(model) if zero_params else None
    try:
        yield
    finally:
        close_leftovers = getattr(coordinator, "release_backward_leftovers", None)
        if close_leftovers is not None:  # what DeepSpeed does after each backward of its own
            close_leftovers()
        if zero_params:
            _release(model, [p for p in zero_params if id(p) not in before])
        if coordinator is not None and coordinator.is_record_trace():
            coordinator._invalidate_trace()  # it is recording the probe's own modules


def _zero3_coordinator(model: nn.Module) -> Any:
    """ZeRO-3's parameter coordinator of ``model`` (DeepSpeed 0.19), or None.

    It is reachable only through the forward hook DeepSpeed registers on every
    module (a closure over its ``DeepSpeedZeRoOffload``).
    """
    for hook in model._forward_pre_hooks.values():
        function = inspect.unwrap(hook)
        code = getattr(function, "__code__", None)
        if code is None or code.co_name != "_pre_forward_module_hook":
            continue
        closure = getattr(function, "__closure__", None) or ()
        cells = dict(zip(code.co_freevars, closure, strict=True))
        offload: Any = cells["self"].cell_contents if "self" in cells else None
        if hasattr(offload, "get_param_coordinator"):
            return offload.get_param_coordinator()
    return None


def _release(model: nn.Module, params: list[Any]) -> None:
    registry = getattr(model, "ds_inflight_param_registry", None)
    leftovers = []
    for param in params:
        if _status(param) == "INFLIGHT" and registry is not None and param in registry:
            registry.pop(param).wait()
        if (
            _status(param) == "AVAILABLE"
            and not getattr(param, "ds_persist", False)
            and not getattr(param, "ds_active_sub_modules", None)
        ):
            leftovers.append(param)
    if leftovers:
        leftovers[0].partition(param_list=leftovers)
