from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunInfo(_message.Message):
    __slots__ = ("run_id", "name", "project", "labels", "framework", "model_type", "world_size", "config_json", "client_version", "kind")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FRAMEWORK_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    project: str
    labels: _containers.ScalarMap[str, str]
    framework: str
    model_type: str
    world_size: int
    config_json: str
    client_version: str
    kind: str
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., project: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., framework: _Optional[str] = ..., model_type: _Optional[str] = ..., world_size: _Optional[int] = ..., config_json: _Optional[str] = ..., client_version: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class OpenRunRequest(_message.Message):
    __slots__ = ("run", "rank", "takeover")
    RUN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TAKEOVER_FIELD_NUMBER: _ClassVar[int]
    run: RunInfo
    rank: int
    takeover: bool
    def __init__(self, run: _Optional[_Union[RunInfo, _Mapping]] = ..., rank: _Optional[int] = ..., takeover: _Optional[bool] = ...) -> None: ...

class OpenRunResponse(_message.Message):
    __slots__ = ("run_id", "display_name", "acked_sequence", "writer_session")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WRITER_SESSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    display_name: str
    acked_sequence: int
    writer_session: str
    def __init__(self, run_id: _Optional[str] = ..., display_name: _Optional[str] = ..., acked_sequence: _Optional[int] = ..., writer_session: _Optional[str] = ...) -> None: ...

class CloseRunRequest(_message.Message):
    __slots__ = ("run_id", "rank", "status", "writer_session")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    WRITER_SESSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    status: str
    writer_session: str
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., status: _Optional[str] = ..., writer_session: _Optional[str] = ...) -> None: ...

class CloseRunResponse(_message.Message):
    __slots__ = ("acked_sequence",)
    ACKED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    acked_sequence: int
    def __init__(self, acked_sequence: _Optional[int] = ...) -> None: ...

class Correlation(_message.Message):
    __slots__ = ("value", "ci_low", "ci_high")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    value: float
    ci_low: float
    ci_high: float
    def __init__(self, value: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ...) -> None: ...

class InversionStats(_message.Message):
    __slots__ = ("spearman", "pearson", "n", "insufficient", "insufficient_reason", "confidence")
    SPEARMAN_FIELD_NUMBER: _ClassVar[int]
    PEARSON_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    INSUFFICIENT_FIELD_NUMBER: _ClassVar[int]
    INSUFFICIENT_REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    spearman: Correlation
    pearson: Correlation
    n: int
    insufficient: bool
    insufficient_reason: str
    confidence: float
    def __init__(self, spearman: _Optional[_Union[Correlation, _Mapping]] = ..., pearson: _Optional[_Union[Correlation, _Mapping]] = ..., n: _Optional[int] = ..., insufficient: _Optional[bool] = ..., insufficient_reason: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("mean", "p10", "p50", "p90")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    P10_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P90_FIELD_NUMBER: _ClassVar[int]
    mean: float
    p10: float
    p50: float
    p90: float
    def __init__(self, mean: _Optional[float] = ..., p10: _Optional[float] = ..., p50: _Optional[float] = ..., p90: _Optional[float] = ...) -> None: ...

class ComponentStats(_message.Message):
    __slots__ = ("layer", "projection", "spearman", "score_mean")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    SPEARMAN_FIELD_NUMBER: _ClassVar[int]
    SCORE_MEAN_FIELD_NUMBER: _ClassVar[int]
    layer: int
    projection: str
    spearman: float
    score_mean: float
    def __init__(self, layer: _Optional[int] = ..., projection: _Optional[str] = ..., spearman: _Optional[float] = ..., score_mean: _Optional[float] = ...) -> None: ...

class TokenSample(_message.Message):
    __slots__ = ("entropy", "score", "token_id")
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    entropy: float
    score: float
    token_id: int
    def __init__(self, entropy: _Optional[float] = ..., score: _Optional[float] = ..., token_id: _Optional[int] = ...) -> None: ...

class StepRecord(_message.Message):
    __slots__ = ("run_id", "rank", "sequence", "step", "wall_time", "inversion", "entropy", "score", "components", "entropy_covariance", "loss", "learning_rate", "samples", "probe_seconds", "spearman_per_token_type", "reward_mean", "reward_std", "policy_entropy_mean", "policy_entropy", "advantage", "grad_norm", "kl", "clip_ratio", "completion_length_mean", "nonfinite_fields", "probe_precision")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    INVERSION_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_COVARIANCE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROBE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPEARMAN_PER_TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    REWARD_STD_FIELD_NUMBER: _ClassVar[int]
    POLICY_ENTROPY_MEAN_FIELD_NUMBER: _ClassVar[int]
    POLICY_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    CLIP_RATIO_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_LENGTH_MEAN_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELDS_FIELD_NUMBER: _ClassVar[int]
    PROBE_PRECISION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    sequence: int
    step: int
    wall_time: float
    inversion: InversionStats
    entropy: Summary
    score: Summary
    components: _containers.RepeatedCompositeFieldContainer[ComponentStats]
    entropy_covariance: float
    loss: float
    learning_rate: float
    samples: _containers.RepeatedCompositeFieldContainer[TokenSample]
    probe_seconds: float
    spearman_per_token_type: float
    reward_mean: float
    reward_std: float
    policy_entropy_mean: float
    policy_entropy: Summary
    advantage: Summary
    grad_norm: float
    kl: float
    clip_ratio: float
    completion_length_mean: float
    nonfinite_fields: _containers.RepeatedScalarFieldContainer[str]
    probe_precision: str
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., sequence: _Optional[int] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ..., inversion: _Optional[_Union[InversionStats, _Mapping]] = ..., entropy: _Optional[_Union[Summary, _Mapping]] = ..., score: _Optional[_Union[Summary, _Mapping]] = ..., components: _Optional[_Iterable[_Union[ComponentStats, _Mapping]]] = ..., entropy_covariance: _Optional[float] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., samples: _Optional[_Iterable[_Union[TokenSample, _Mapping]]] = ..., probe_seconds: _Optional[float] = ..., spearman_per_token_type: _Optional[float] = ..., reward_mean: _Optional[float] = ..., reward_std: _Optional[float] = ..., policy_entropy_mean: _Optional[float] = ..., policy_entropy: _Optional[_Union[Summary, _Mapping]] = ..., advantage: _Optional[_Union[Summary, _Mapping]] = ..., grad_norm: _Optional[float] = ..., kl: _Optional[float] = ..., clip_ratio: _Optional[float] = ..., completion_length_mean: _Optional[float] = ..., nonfinite_fields: _Optional[_Iterable[str]] = ..., probe_precision: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("records", "writer_session")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    WRITER_SESSION_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[StepRecord]
    writer_session: str
    def __init__(self, records: _Optional[_Iterable[_Union[StepRecord, _Mapping]]] = ..., writer_session: _Optional[str] = ...) -> None: ...

class RankAck(_message.Message):
    __slots__ = ("run_id", "rank", "acked_sequence")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    acked_sequence: int
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., acked_sequence: _Optional[int] = ...) -> None: ...

class RejectedRecord(_message.Message):
    __slots__ = ("run_id", "rank", "sequence", "field", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rank: int
    sequence: int
    field: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., rank: _Optional[int] = ..., sequence: _Optional[int] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("acks", "rejected", "accepted", "duplicates")
    ACKS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[RankAck]
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedRecord]
    accepted: int
    duplicates: int
    def __init__(self, acks: _Optional[_Iterable[_Union[RankAck, _Mapping]]] = ..., rejected: _Optional[_Iterable[_Union[RejectedRecord, _Mapping]]] = ..., accepted: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("name", "severity", "active", "start_step", "end_step", "start_time", "end_time", "summary", "description", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    severity: str
    active: bool
    start_step: int
    end_step: int
    start_time: float
    end_time: float
    summary: str
    description: str
    values: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., severity: _Optional[str] = ..., active: _Optional[bool] = ..., start_step: _Optional[int] = ..., end_step: _Optional[int] = ..., start_time: _Optional[float] = ..., end_time: _Optional[float] = ..., summary: _Optional[str] = ..., description: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run", "display_name", "opened_time", "last_update_time", "status", "records", "latest", "active_alerts")
    RUN_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    OPENED_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ALERTS_FIELD_NUMBER: _ClassVar[int]
    run: RunInfo
    display_name: str
    opened_time: float
    last_update_time: float
    status: str
    records: int
    latest: StepRecord
    active_alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, run: _Optional[_Union[RunInfo, _Mapping]] = ..., display_name: _Optional[str] = ..., opened_time: _Optional[float] = ..., last_update_time: _Optional[float] = ..., status: _Optional[str] = ..., records: _Optional[int] = ..., latest: _Optional[_Union[StepRecord, _Mapping]] = ..., active_alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("project", "limit")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    project: str
    limit: int
    def __init__(self, project: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "truncated", "max_bytes")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    truncated: bool
    max_bytes: int
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ..., truncated: _Optional[bool] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run", "history_limit")
    RUN_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    run: str
    history_limit: int
    def __init__(self, run: _Optional[str] = ..., history_limit: _Optional[int] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("summary", "history", "alerts", "truncated", "max_bytes")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    summary: RunSummary
    history: _containers.RepeatedCompositeFieldContainer[StepRecord]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    truncated: bool
    max_bytes: int
    def __init__(self, summary: _Optional[_Union[RunSummary, _Mapping]] = ..., history: _Optional[_Iterable[_Union[StepRecord, _Mapping]]] = ..., alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., truncated: _Optional[bool] = ..., max_bytes: _Optional[int] = ...) -> None: ...
