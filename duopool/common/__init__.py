"""Shared plumbing: config, gRPC, Redis, telemetry."""
