"""A minimal OTLP/gRPC trace receiver: collects spans exported by the services (tests, local debugging).

It is a real OTLP endpoint (the opentelemetry-proto TraceService), so the services export to it exactly as
they would to an OpenTelemetry Collector. Spans are kept in memory and optionally appended as JSON lines.
"""

from __future__ import annotations

import json
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)
    events: list = field(default_factory=list)  # [{"name", "time_ns", "attributes"}]


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind in ("string_value", "int_value", "double_value", "bool_value") else str(v)


def _attrs(kvs) -> dict:
    return {a.key: _value(a.value) for a in kvs}


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpSink) -> None:
        self.sink = sink

    def Export(self, request, context):
        spans = []
        for rs in request.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, service,
                                      s.start_time_unix_nano, s.end_time_unix_nano, _attrs(s.attributes),
                                      [{"name": e.name, "time_ns": e.time_unix_nano, "attributes": _attrs(e.attributes)}
                                       for e in s.events]))
        self.sink._add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpSink:
    def __init__(self, port: int = 0, jsonl_path: str | None = None, max_bytes: int = 256 << 20,
                 keep_in_memory: int = 200_000) -> None:
        """``jsonl_path``: also append every span there, as one JSON object per line; past ``max_bytes`` the
        file is moved to ``<path>.1`` (one old file kept) and a new one begun. At most ``keep_in_memory``
        spans are kept in memory (the oldest go first)."""
        self.max_bytes, self.keep = max_bytes, keep_in_memory
        self.jsonl_path = jsonl_path
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Receiver(self), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        self._jsonl = open(jsonl_path, "a") if jsonl_path else None  # noqa: SIM115

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _add(self, spans: list[Span]) -> None:
        with self._lock:
            self._spans.extend(spans)
            if len(self._spans) > self.keep:
                del self._spans[: len(self._spans) - self.keep]
            if self._jsonl:
                for s in spans:
                    self._jsonl.write(json.dumps(s.__dict__) + "\n")
                self._jsonl.flush()
                if self._jsonl.tell() > self.max_bytes:
                    import os

                    self._jsonl.close()
                    os.replace(self.jsonl_path, self.jsonl_path + ".1")
                    self._jsonl = open(self.jsonl_path, "a")  # noqa: SIM115

    def spans(self, trace_id: str | None = None) -> list[Span]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def start(self) -> OtlpSink:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)
        if self._jsonl:
            self._jsonl.close()
