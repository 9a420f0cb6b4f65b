"""OpenTelemetry set-up shared by every service.

The exporter is chosen with the standard variables: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console`` or
``none``; default ``otlp`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
is set, else ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP/gRPC, e.g. http://127.0.0.1:4317),
``OTEL_SERVICE_NAME`` (default ``duopool-<service>``), and the ``OTEL_BSP_*`` batch settings.
Exports to a dead collector must not stall shutdown, so the export timeouts default low (2 s).

With no exporter configured (the default without an OTLP endpoint, or ``OTEL_TRACES_EXPORTER=none``)
nothing is installed: a no-op tracer and no gRPC interceptors, so tracing off costs nothing per request.
Otherwise gRPC instrumentation is switched on here, before any channel or server exists, so trace context
propagates over gRPC metadata and one ``Generate`` is one trace across all services. Health checks and
server reflection (probes, grpcurl) are not traced, on the server side nor the client side; nor are the
services named in ``OTEL_PYTHON_GRPC_EXCLUDED_SERVICES`` (comma-separated full names).
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace

log = logging.getLogger(__name__)

_initialised = False

UNTRACED_SERVICE_PREFIXES = ("grpc.health.v1.", "grpc.reflection.")


def grpc_trace_filter():
    """The ``filter_`` of the gRPC instrumentation: true for a call to trace (not health, not reflection,
    not a service in ``OTEL_PYTHON_GRPC_EXCLUDED_SERVICES``)."""
    from opentelemetry.instrumentation.grpc import filters

    excluded = [filters.service_prefix(p) for p in UNTRACED_SERVICE_PREFIXES]
    excluded += [filters.service_name(s.strip())
                 for s in os.environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "").split(",") if s.strip()]
    return filters.negate(filters.any_of(*excluded))


def configured_exporters() -> list[str]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names (``none`` dropped; unset: ``otlp`` when an OTLP
    endpoint is set, else none)."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER")
    if exporter_name is None:
        has_endpoint = any(
            os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        exporter_name = "otlp" if has_endpoint else "none"
    return [e for e in (x.strip() for x in exporter_name.split(",")) if e not in ("none", "")]


def init_telemetry(service: str) -> trace.Tracer:
    global _initialised
    if not _initialised:
        _initialised = True
        exporters = configured_exporters()
        if os.environ.get("DUOPOOL_TRACING", "1") in ("0", "false", "off") or not exporters:
            # No exporter: a no-op tracer, no gRPC interceptors, no span work on the request path at all.
            return trace.get_tracer(f"duopool.{service}")
        os.environ.setdefault("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
        os.environ.setdefault("OTEL_BSP_EXPORT_TIMEOUT", "2000")
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        name = os.environ.get("OTEL_SERVICE_NAME") or f"duopool-{service}"
        provider = TracerProvider(resource=Resource.create({"service.name": name, "duopool.service": service}))
        for exp in exporters:
            if exp == "otlp":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            elif exp == "console":
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            else:
                raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {exp!r} (otlp, console, none)")
        trace.set_tracer_provider(provider)
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer

        traced = grpc_trace_filter()
        for instrumentor in (GrpcAioInstrumentorServer(filter_=traced), GrpcAioInstrumentorClient(filter_=traced)):
            # With OTEL_PYTHON_GRPC_EXCLUDED_SERVICES set the instrumentor ORs its own exclusion into filter_
            # (any_of), which would trace health and reflection again; our filter already has those services.
            instrumentor._filter = traced
            instrumentor.instrument()
    return trace.get_tracer(f"duopool.{service}")


def shutdown_telemetry() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown:
        try:
            shutdown()
        except Exception:  # noqa: BLE001 - never fail a service's exit over telemetry
            log.debug("telemetry shutdown failed", exc_info=True)


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
