from duopool.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_STATE_UNSPECIFIED: _ClassVar[TransferState]
    PENDING: _ClassVar[TransferState]
    READY: _ClassVar[TransferState]
    COMPLETED: _ClassVar[TransferState]
    FAILED: _ClassVar[TransferState]
    EXPIRED: _ClassVar[TransferState]
    RELEASED: _ClassVar[TransferState]
    PARKED: _ClassVar[TransferState]
TRANSFER_STATE_UNSPECIFIED: TransferState
PENDING: TransferState
READY: TransferState
COMPLETED: TransferState
FAILED: TransferState
EXPIRED: TransferState
RELEASED: TransferState
PARKED: TransferState

class RegisterEndpointRequest(_message.Message):
    __slots__ = ("worker_id", "host", "transports")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host: str
    transports: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., host: _Optional[str] = ..., transports: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterEndpointResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StartTransferRequest(_message.Message):
    __slots__ = ("kv", "destination_worker", "destination_host", "lease_s")
    KV_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_WORKER_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_HOST_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    kv: _common_pb2.KvHandle
    destination_worker: str
    destination_host: str
    lease_s: float
    def __init__(self, kv: _Optional[_Union[_common_pb2.KvHandle, _Mapping]] = ..., destination_worker: _Optional[str] = ..., destination_host: _Optional[str] = ..., lease_s: _Optional[float] = ...) -> None: ...

class PollTransferRequest(_message.Message):
    __slots__ = ("transfer_id", "wait_ms", "destination_host")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_HOST_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    wait_ms: int
    destination_host: str
    def __init__(self, transfer_id: _Optional[str] = ..., wait_ms: _Optional[int] = ..., destination_host: _Optional[str] = ...) -> None: ...

class CompleteTransferRequest(_message.Message):
    __slots__ = ("transfer_id", "ok", "error")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    ok: bool
    error: str
    def __init__(self, transfer_id: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ReleaseTransferRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class TransferStatus(_message.Message):
    __slots__ = ("transfer_id", "state", "kv", "error")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    state: TransferState
    kv: _common_pb2.KvHandle
    error: str
    def __init__(self, transfer_id: _Optional[str] = ..., state: _Optional[_Union[TransferState, str]] = ..., kv: _Optional[_Union[_common_pb2.KvHandle, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("transfer_id", "chunk_bytes", "units")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    chunk_bytes: int
    units: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, transfer_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ..., units: _Optional[_Iterable[int]] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class KvStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KvStatsResponse(_message.Message):
    __slots__ = ("active_transfers", "active_bytes", "completed", "failed", "expired", "bytes_moved", "released", "parked_transfers", "bytes_streamed", "active_reads", "pool_capacity_bytes", "pool_used_bytes", "pool_entries", "pool_parks", "pool_evictions", "pool_evicted_bytes", "pool_hits", "pool_misses", "pool_refused", "pool_policy")
    ACTIVE_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    PARKED_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_STREAMED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_READS_FIELD_NUMBER: _ClassVar[int]
    POOL_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    POOL_PARKS_FIELD_NUMBER: _ClassVar[int]
    POOL_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    POOL_EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_HITS_FIELD_NUMBER: _ClassVar[int]
    POOL_MISSES_FIELD_NUMBER: _ClassVar[int]
    POOL_REFUSED_FIELD_NUMBER: _ClassVar[int]
    POOL_POLICY_FIELD_NUMBER: _ClassVar[int]
    active_transfers: int
    active_bytes: int
    completed: int
    failed: int
    expired: int
    bytes_moved: int
    released: int
    parked_transfers: int
    bytes_streamed: int
    active_reads: int
    pool_capacity_bytes: int
    pool_used_bytes: int
    pool_entries: int
    pool_parks: int
    pool_evictions: int
    pool_evicted_bytes: int
    pool_hits: int
    pool_misses: int
    pool_refused: int
    pool_policy: str
    def __init__(self, active_transfers: _Optional[int] = ..., active_bytes: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., expired: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., released: _Optional[int] = ..., parked_transfers: _Optional[int] = ..., bytes_streamed: _Optional[int] = ..., active_reads: _Optional[int] = ..., pool_capacity_bytes: _Optional[int] = ..., pool_used_bytes: _Optional[int] = ..., pool_entries: _Optional[int] = ..., pool_parks: _Optional[int] = ..., pool_evictions: _Optional[int] = ..., pool_evicted_bytes: _Optional[int] = ..., pool_hits: _Optional[int] = ..., pool_misses: _Optional[int] = ..., pool_refused: _Optional[int] = ..., pool_policy: _Optional[str] = ...) -> None: ...

class ParkRequest(_message.Message):
    __slots__ = ("key", "transfer_id", "location", "priority")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    key: str
    transfer_id: str
    location: str
    priority: int
    def __init__(self, key: _Optional[str] = ..., transfer_id: _Optional[str] = ..., location: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class ParkResponse(_message.Message):
    __slots__ = ("key", "num_bytes", "num_tokens", "evicted")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    key: str
    num_bytes: int
    num_tokens: int
    evicted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., num_bytes: _Optional[int] = ..., num_tokens: _Optional[int] = ..., evicted: _Optional[_Iterable[str]] = ...) -> None: ...

class TakeRequest(_message.Message):
    __slots__ = ("key", "new_transfer_id", "destination_worker", "destination_host", "lease_s")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NEW_TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_WORKER_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_HOST_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    key: str
    new_transfer_id: str
    destination_worker: str
    destination_host: str
    lease_s: float
    def __init__(self, key: _Optional[str] = ..., new_transfer_id: _Optional[str] = ..., destination_worker: _Optional[str] = ..., destination_host: _Optional[str] = ..., lease_s: _Optional[float] = ...) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class DropResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...
