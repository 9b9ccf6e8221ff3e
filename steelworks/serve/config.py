"""Configuration of the OpenAI-compatible serving stage."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    model_name: str | None = None  # the id in /v1/models; default: the demo model name
    # When a key is set, every route but /health and the static chat page needs
    # "Authorization: Bearer <key>". Prefer the environment variable named by api_key_env
    # (default STEELWORKS_API_KEY) over writing the key into a config file: api_key wins when
    # both are set; api_key_env "" turns the lookup off. The key is never written to a
    # manifest (rundir redacts it), logged, printed or shown in this dataclass's repr.
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str = "STEELWORKS_API_KEY"
    # Largest request body accepted (413 beyond it), checked on Content-Length and on the
    # bytes as they arrive: a chat request is kilobytes; 4 MiB leaves room for long contexts
    # (a 128k-token prompt is ~0.5 MB of English; Chinese sent as \uXXXX JSON escapes ~1.2 MB).
    max_request_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 64  # default completion length
    num_replicas: int = 1  # fixed replica count (when max_replicas is not set)
    # Autoscaling (Ray Serve): set max_replicas to scale between min_replicas and it, aiming at
    # target_ongoing_requests per replica.
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; > 0 puts the engine on CUDA
    # Which engine a replica runs (loader.py): "vllm", "builtin", or "auto": vLLM where it is
    # installed and supports the model, except on CPU for models below
    # auto_vllm_min_params, where the built-in engine is faster (benchmarks/serve_load.py).
    engine: Literal["auto", "vllm", "builtin"] = "auto"
    auto_vllm_min_params: int = 20_000_000
    kv_cache_gib: int = 1  # vLLM on CPU: KV cache size per replica (VLLM_CPU_KVCACHE_SPACE)
    max_batch_size: int = 16  # sequences decoded together by a replica's engine
    max_queue: int = 64  # requests waiting for a batch slot; beyond it the app answers 503
    max_ongoing_requests: int = 128  # per replica, as Ray Serve routes them (batch + queue)
    max_queued_requests: int = 256  # in Serve's proxy; beyond this Serve answers 503
    # Benchmarks POST /v1/evals may run: name -> directory in C-Eval layout on the server.
    benchmarks: dict[str, str] = field(default_factory=dict)
    eval_sync_items: int = 200  # up to this many items /v1/evals answers at once, else a job id
    # Finished /v1/evals jobs kept for polling (newest first; running ones always stay): each
    # holds a report, so a replica that lives for weeks must not keep them all.
    eval_keep_jobs: int = 32
    smoke_test: bool = True  # the pipeline asks the self-cognition question once deployed
    keep_running: bool = False  # the pipeline leaves the deployment up when it finishes

    def resolve_api_key(self) -> str | None:
        """The key requests must present: ``api_key``, else the variable ``api_key_env``
        names, else None (no auth). Read when an app is built or deployed, never stored back
        here, so a config written to a manifest never holds a key from the environment."""
        if self.api_key:
            return self.api_key
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    def __post_init__(self) -> None:
        if self.eval_keep_jobs < 0:
            raise ValueError(f"serve.eval_keep_jobs must be >= 0, got {self.eval_keep_jobs}")
        if self.max_request_bytes < 1:
            raise ValueError(f"serve.max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.max_batch_size < 1 or self.max_queue < 0:
            raise ValueError("serve.max_batch_size must be >= 1 and serve.max_queue >= 0")
        if self.max_replicas is not None and not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("serve: need 1 <= min_replicas <= max_replicas")
