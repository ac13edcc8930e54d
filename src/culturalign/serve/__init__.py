"""Serve the base model, its cultural experts and their committee over an OpenAI-compatible HTTP API.

    config.py   ServeConfig: every limit and default, validated (the CLI reads its defaults here)
    schemas.py  request bodies as strict pydantic models
    batcher.py  the bounded request queue and the one worker thread that runs the model in batches
    app.py      create_app(backend, committee, config): routes, errors in OpenAI's shape, the log line
    server.py   host and port checks, the bound socket, uvicorn

`culturalign serve` puts these together; tests build the app from a tiny model and registry.
`create_app` is imported on first use, so that the CLI can read `ServeConfig` without loading
FastAPI and torch.
"""

from culturalign.serve.config import ServeConfig

__all__ = ["create_app", "ServeConfig"]


def __getattr__(name: str):
    if name == "create_app":
        from culturalign.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'culturalign.serve' has no attribute {name!r}")
