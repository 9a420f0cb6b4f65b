from duopool.v1 import common_pb2 as _common_pb2
from duopool.v1 import router_pb2 as _router_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SetWorkerRoleRequest(_message.Message):
    __slots__ = ("worker_id", "role", "pool", "reason")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _common_pb2.WorkerRole
    pool: _common_pb2.Pool
    reason: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., pool: _Optional[_Union[_common_pb2.Pool, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class PlaceRequest(_message.Message):
    __slots__ = ("request_id", "request_class", "prompt_tokens", "max_tokens", "slo", "exclude_workers", "client_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CLASS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    request_class: _common_pb2.RequestClass
    prompt_tokens: int
    max_tokens: int
    slo: _common_pb2.Slo
    exclude_workers: _containers.RepeatedScalarFieldContainer[str]
    client_id: str
    def __init__(self, request_id: _Optional[str] = ..., request_class: _Optional[_Union[_common_pb2.RequestClass, str]] = ..., prompt_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., slo: _Optional[_Union[_common_pb2.Slo, _Mapping]] = ..., exclude_workers: _Optional[_Iterable[str]] = ..., client_id: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("request_id", "prefill", "decode", "policy", "report_first_token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefill: _common_pb2.WorkerInfo
    decode: _common_pb2.WorkerInfo
    policy: str
    report_first_token: bool
    def __init__(self, request_id: _Optional[str] = ..., prefill: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., decode: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., policy: _Optional[str] = ..., report_first_token: _Optional[bool] = ...) -> None: ...

class FirstTokenRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "ttft_ms", "tpot_ms", "slo")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ttft_ms: float
    tpot_ms: float
    slo: _common_pb2.Slo
    def __init__(self, request_id: _Optional[str] = ..., ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ..., slo: _Optional[_Union[_common_pb2.Slo, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("seq", "place", "release", "traceparent")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PLACE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    place: PlaceRequest
    release: ReleaseRequest
    traceparent: str
    def __init__(self, seq: _Optional[int] = ..., place: _Optional[_Union[PlaceRequest, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("seq", "placement", "code", "details")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    placement: Placement
    code: int
    details: str
    def __init__(self, seq: _Optional[int] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...

class SchedulerStatsRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class SchedulerStats(_message.Message):
    __slots__ = ("online_inflight", "offline_inflight", "preemptions", "preemption_ms_p50", "preemption_ms_p99", "offline_completed", "offline_requeued", "policy", "preemption_ms", "preempt_trigger", "slo_pressure", "role_moves", "decisions", "request_decisions", "offline_tokens", "resumed_parked", "resumed_recomputed", "tokens_not_recomputed", "offline_moved")
    class SloPressureEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class DecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ResumedRecomputedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ONLINE_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_MS_P50_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_MS_P99_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_REQUEUED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PREEMPTION_MS_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_TRIGGER_FIELD_NUMBER: _ClassVar[int]
    SLO_PRESSURE_FIELD_NUMBER: _ClassVar[int]
    ROLE_MOVES_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_PARKED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_NOT_RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_MOVED_FIELD_NUMBER: _ClassVar[int]
    online_inflight: int
    offline_inflight: int
    preemptions: int
    preemption_ms_p50: float
    preemption_ms_p99: float
    offline_completed: int
    offline_requeued: int
    policy: str
    preemption_ms: _containers.RepeatedScalarFieldContainer[float]
    preempt_trigger: str
    slo_pressure: _containers.ScalarMap[str, float]
    role_moves: int
    decisions: _containers.ScalarMap[str, int]
    request_decisions: _containers.RepeatedScalarFieldContainer[str]
    offline_tokens: int
    resumed_parked: int
    resumed_recomputed: _containers.ScalarMap[str, int]
    tokens_not_recomputed: int
    offline_moved: int
    def __init__(self, online_inflight: _Optional[int] = ..., offline_inflight: _Optional[int] = ..., preemptions: _Optional[int] = ..., preemption_ms_p50: _Optional[float] = ..., preemption_ms_p99: _Optional[float] = ..., offline_completed: _Optional[int] = ..., offline_requeued: _Optional[int] = ..., policy: _Optional[str] = ..., preemption_ms: _Optional[_Iterable[float]] = ..., preempt_trigger: _Optional[str] = ..., slo_pressure: _Optional[_Mapping[str, float]] = ..., role_moves: _Optional[int] = ..., decisions: _Optional[_Mapping[str, int]] = ..., request_decisions: _Optional[_Iterable[str]] = ..., offline_tokens: _Optional[int] = ..., resumed_parked: _Optional[int] = ..., resumed_recomputed: _Optional[_Mapping[str, int]] = ..., tokens_not_recomputed: _Optional[int] = ..., offline_moved: _Optional[int] = ...) -> None: ...
