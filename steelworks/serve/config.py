"""Configuration of the OpenAI-compatible serving stage."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    model_name: str | None = None  # the id in /v1/models; default: the demo model name
    api_key: str | None = None  # when set, every route but /health needs "Bearer <key>"
    max_tokens: int = 64  # default completion length
    num_replicas: int = 1  # fixed replica count (when max_replicas is not set)
    # Autoscaling (Ray Serve): set max_replicas to scale between min_replicas and it, aiming at
    # target_ongoing_requests per replica.
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; > 0 puts the engine on CUDA
    max_batch_size: int = 16  # sequences decoded together by a replica's engine
    max_queue: int = 64  # requests waiting for a batch slot; beyond it the app answers 503
    max_ongoing_requests: int = 128  # per replica, as Ray Serve routes them (batch + queue)
    max_queued_requests: int = 256  # in Serve's proxy; beyond this Serve answers 503
    # Benchmarks POST /v1/evals may run: name -> directory in C-Eval layout on the server.
    benchmarks: dict[str, str] = field(default_factory=dict)
    eval_sync_items: int = 200  # up to this many items /v1/evals answers at once, else a job id
    smoke_test: bool = True  # the pipeline asks the self-cognition question once deployed
    keep_running: bool = False  # the pipeline leaves the deployment up when it finishes

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 0:
            raise ValueError("serve.max_batch_size must be >= 1 and serve.max_queue >= 0")
        if self.max_replicas is not None and not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("serve: need 1 <= min_replicas <= max_replicas")
