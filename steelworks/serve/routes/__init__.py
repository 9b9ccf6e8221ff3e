"""The routes of the serving app, one router per concern, each included by ``build_app``
(serve/app.py):

    ops        GET /health, GET /metrics (Prometheus)
    page       GET / and /chat: the static web chat page
    docs       GET /openapi.json, /docs, /redoc, behind the API key
    openai     /v1/models, /v1/chat/completions, /v1/completions (streaming in streaming.py)
    evals      /v1/evals: benchmarks scored through the engine

Routers hold no state of their own: what the routes of one app share (engine, config,
metrics, API key, eval jobs) is its ``ServeState`` (state.py), on ``app.state.serve``.
"""
