"""The training-health fields of a ``StepRecord``: the one list both sides use.

One health record goes out per optimizer step whatever the probe schedule; it
may carry only these fields (no ``inversion``). Each is an ``optional double``
of ``StepRecord``; a non-finite value travels as itself and is also named in
``StepRecord.nonfinite_fields``, whose entries must be names from
:data:`HEALTH_FIELDS`.

>>> from inversion_monitor.proto.v1 import monitor_pb2
>>> fields = monitor_pb2.StepRecord.DESCRIPTOR.fields_by_name
>>> all(fields[name].type == fields[name].TYPE_DOUBLE for name in HEALTH_FIELDS)
True
>>> "grad_norm" in HEALTH_FIELDS, "spearman" in HEALTH_FIELDS
(True, False)
"""

from __future__ import annotations

HEALTH_FIELDS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "reward_mean",
    "reward_std",
    "policy_entropy_mean",
    "entropy_covariance",
    "kl",
    "clip_ratio",
    "completion_length_mean",
)
"""Per-step training values taken from the trainer (grad_norm before clipping)."""

RL_HEALTH_FIELDS = HEALTH_FIELDS[3:]
"""The fields only RL runs carry."""
