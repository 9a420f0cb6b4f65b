from duopool.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "messages", "max_tokens", "sampling", "request_class", "export_kv", "decode_worker", "decode_host", "chat", "fit_max_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CLASS_FIELD_NUMBER: _ClassVar[int]
    EXPORT_KV_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_FIELD_NUMBER: _ClassVar[int]
    DECODE_HOST_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    FIT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _common_pb2.TokenIds
    messages: _common_pb2.ChatMessages
    max_tokens: int
    sampling: _common_pb2.SamplingParams
    request_class: _common_pb2.RequestClass
    export_kv: bool
    decode_worker: str
    decode_host: str
    chat: bool
    fit_max_tokens: bool
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., messages: _Optional[_Union[_common_pb2.ChatMessages, _Mapping]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., request_class: _Optional[_Union[_common_pb2.RequestClass, str]] = ..., export_kv: _Optional[bool] = ..., decode_worker: _Optional[str] = ..., decode_host: _Optional[str] = ..., chat: _Optional[bool] = ..., fit_max_tokens: _Optional[bool] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("prompt_token_ids", "first_token_id", "first_token_text", "finished", "finish_reason", "kv", "engine_ms", "max_tokens")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    ENGINE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token_id: int
    first_token_text: str
    finished: bool
    finish_reason: str
    kv: _common_pb2.KvHandle
    engine_ms: float
    max_tokens: int
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token_id: _Optional[int] = ..., first_token_text: _Optional[str] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., kv: _Optional[_Union[_common_pb2.KvHandle, _Mapping]] = ..., engine_ms: _Optional[float] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "generated_token_ids", "max_tokens", "sampling", "request_class", "kv", "park_key")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_CLASS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    PARK_KEY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: _common_pb2.SamplingParams
    request_class: _common_pb2.RequestClass
    kv: _common_pb2.KvHandle
    park_key: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., request_class: _Optional[_Union[_common_pb2.RequestClass, str]] = ..., kv: _Optional[_Union[_common_pb2.KvHandle, _Mapping]] = ..., park_key: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finished", "finish_reason", "cached_tokens", "parked_key", "parked_tokens", "park_failure")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARKED_KEY_FIELD_NUMBER: _ClassVar[int]
    PARKED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARK_FAILURE_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    cached_tokens: int
    parked_key: str
    parked_tokens: int
    park_failure: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., parked_key: _Optional[str] = ..., parked_tokens: _Optional[int] = ..., park_failure: _Optional[str] = ...) -> None: ...

class LocalResponse(_message.Message):
    __slots__ = ("prompt_token_ids", "text", "token_ids", "finished", "finish_reason", "max_tokens", "engine_ms", "parked_key", "parked_tokens", "park_failure")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_MS_FIELD_NUMBER: _ClassVar[int]
    PARKED_KEY_FIELD_NUMBER: _ClassVar[int]
    PARKED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARK_FAILURE_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    max_tokens: int
    engine_ms: float
    parked_key: str
    parked_tokens: int
    park_failure: str
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., max_tokens: _Optional[int] = ..., engine_ms: _Optional[float] = ..., parked_key: _Optional[str] = ..., parked_tokens: _Optional[int] = ..., park_failure: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "kv")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kv: _common_pb2.KvHandle
    def __init__(self, request_id: _Optional[str] = ..., kv: _Optional[_Union[_common_pb2.KvHandle, _Mapping]] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("info", "requests_served", "tokens_generated", "simulated", "running_online", "running_offline", "step_plans")
    INFO_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_ONLINE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    STEP_PLANS_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.WorkerInfo
    requests_served: int
    tokens_generated: int
    simulated: bool
    running_online: int
    running_offline: int
    step_plans: StepPlanStats
    def __init__(self, info: _Optional[_Union[_common_pb2.WorkerInfo, _Mapping]] = ..., requests_served: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., simulated: _Optional[bool] = ..., running_online: _Optional[int] = ..., running_offline: _Optional[int] = ..., step_plans: _Optional[_Union[StepPlanStats, _Mapping]] = ...) -> None: ...

class StepPlanStats(_message.Message):
    __slots__ = ("policy", "steps", "planned_steps", "preempted", "predictor_fitted", "predictor_samples", "predictor_mape", "preempt_latency_p50_ms", "preempt_latency_p99_ms")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_FITTED_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_MAPE_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_LATENCY_P99_MS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    steps: int
    planned_steps: int
    preempted: int
    predictor_fitted: bool
    predictor_samples: int
    predictor_mape: float
    preempt_latency_p50_ms: float
    preempt_latency_p99_ms: float
    def __init__(self, policy: _Optional[str] = ..., steps: _Optional[int] = ..., planned_steps: _Optional[int] = ..., preempted: _Optional[int] = ..., predictor_fitted: _Optional[bool] = ..., predictor_samples: _Optional[int] = ..., predictor_mape: _Optional[float] = ..., preempt_latency_p50_ms: _Optional[float] = ..., preempt_latency_p99_ms: _Optional[float] = ...) -> None: ...

class PreemptRequest(_message.Message):
    __slots__ = ("request_class", "max_requests", "reason", "request_ids")
    REQUEST_CLASS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_class: _common_pb2.RequestClass
    max_requests: int
    reason: str
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_class: _Optional[_Union[_common_pb2.RequestClass, str]] = ..., max_requests: _Optional[int] = ..., reason: _Optional[str] = ..., request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PreemptResponse(_message.Message):
    __slots__ = ("request_ids", "stop_ms")
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_MS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    stop_ms: float
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ..., stop_ms: _Optional[float] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("role", "pool", "offline_only")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_ONLY_FIELD_NUMBER: _ClassVar[int]
    role: _common_pb2.WorkerRole
    pool: _common_pb2.Pool
    offline_only: bool
    def __init__(self, role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., pool: _Optional[_Union[_common_pb2.Pool, str]] = ..., offline_only: _Optional[bool] = ...) -> None: ...
