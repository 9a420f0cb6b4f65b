"""A minimal OTLP/gRPC trace receiver: collects spans exported by the services (tests, local debugging).

It is a real OTLP endpoint (the opentelemetry-proto TraceService), so the services export to it exactly as
they would to an OpenTelemetry Collector. Spans are kept in memory and optionally appended as JSON lines.
"""

from __future__ import annotations

import json
import threading
from concurrent import futures
from dataclasses import dataclass

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
                                      s.start_time_unix_nano, s.end_time_unix_nano))
        self.sink._add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpSink:
    def __init__(self, port: int = 0, jsonl_path: str | None = None) -> None:
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
            if self._jsonl:
                for s in spans:
                    self._jsonl.write(json.dumps(s.__dict__) + "\n")
                self._jsonl.flush()

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
