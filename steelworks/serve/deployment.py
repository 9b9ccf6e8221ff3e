"""Ray Serve wrapper: each replica loads the engine and serves the FastAPI app of app.py.

Ray 2.60's ``serve.ingress()`` with no argument defers the app to replica start: the class's
``__serve_build_asgi_app__`` runs after ``__init__`` and returns the ASGI app. That lets the
app hold the replica's engine, so the routes exist once (serve/routes/, assembled by
app.py's ``build_app``) for plain uvicorn, TestClient and Serve alike; the older
``@serve.ingress(app)`` style would need the routes to be methods of the deployment class.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastapi import FastAPI
from ray import serve

from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress()
class SteelworksServer:
    def __init__(self, model_dir: str, config: ServeConfig) -> None:
        from steelworks.core.rundir import stage_path
        from steelworks.inference.loader import load_engine

        device = "cuda" if config.num_gpus > 0 else "cpu"
        # A URI when the run is in a bucket: a replica on another node fetches the model.
        model_dir = str(stage_path(model_dir))
        self.engine = load_engine(model_dir, config, device)  # serve.engine: auto | vllm | builtin
        self.config = config

    def __del__(self) -> None:
        # Graceful shutdown: Serve drains in-flight requests (graceful_shutdown_timeout_s)
        # before it deletes the replica; then the engine's scheduler thread stops.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def check_health(self) -> None:
        """Ray Serve calls this periodically (``health_check_period_s``); raising marks the
        replica unhealthy, and Serve stops it and starts a replacement. A replica whose engine
        died would otherwise stay in rotation and fail every request."""
        self.engine.check_health()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self.engine, self.config)


def deploy(model_dir: str | Path, config: ServeConfig, name: str = "steelworks") -> str:
    """Start Serve's HTTP proxy on ``config.host:port``, deploy the model, return the base URL
    (``.../v1`` is the OpenAI API). Ray must already be initialised; returns once replicas
    are healthy."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory")
    # Resolve the API key here, on the driver, where the user exported STEELWORKS_API_KEY:
    # replicas on other nodes do not inherit this shell's environment. It travels in the
    # pickled constructor arguments (not runtime_env env_vars, which the dashboard shows).
    config = dataclasses.replace(config, api_key=config.resolve_api_key())
    # Cluster-wide and fixed once started: a second deploy() reuses the running proxy.
    serve.start(http_options={"host": config.host, "port": config.port})
    scaling: dict = {"num_replicas": config.num_replicas}
    if config.max_replicas is not None:
        scaling = {"autoscaling_config": {"min_replicas": config.min_replicas,
                                          "max_replicas": config.max_replicas,
                                          "target_ongoing_requests": config.target_ongoing_requests}}
    server = SteelworksServer.options(
        name=name,
        **scaling,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        # Serve answers 503 beyond this queue instead of letting requests pile up.
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
    )
    from steelworks.core.storage import uri_of

    serve.run(server.bind(uri_of(model_dir) or str(model_dir), config), name=name,
              route_prefix=config.route_prefix, blocking=False)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    return f"http://{host}:{config.port}{config.route_prefix.rstrip('/')}"


def shutdown(name: str | None = None) -> None:
    """Delete one application (``name``) or shut Serve down entirely (``None``)."""
    if name is None:
        serve.shutdown()
    else:
        serve.delete(name)
