"""Configuration of the OpenAI-compatible serving stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    model_name: str | None = None  # the id in /v1/models; default: the demo model name
    api_key: str | None = None  # when set, every route but /health needs "Bearer <key>"
    max_tokens: int = 64  # default completion length
    num_replicas: int = 1
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; > 0 puts the engine on CUDA
    max_ongoing_requests: int = 8  # per replica; generation is one sequence at a time for now
    max_queued_requests: int = 64  # beyond this Ray Serve answers 503
    smoke_test: bool = True  # the pipeline asks the self-cognition question once deployed
    keep_running: bool = False  # the pipeline leaves the deployment up when it finishes
