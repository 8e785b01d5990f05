"""`mxc-serve`: an OpenAI-compatible HTTP server for the model (FastAPI + uvicorn).

`create_app(model, engine, name)` builds the ASGI app; `make_engine(model, ...)` the model thread that
runs requests (continuous batching, see `batching`; one at a time, `engine`). Needs the "serve" extra: `pip install ".[serve]"`.
"""
from .app import create_app
from .engines import make_engine

__all__ = ["create_app", "make_engine"]
