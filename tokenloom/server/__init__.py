"""OpenAI-compatible HTTP server over the async engine (FastAPI + uvicorn)."""

from tokenloom.server.app import build_app, run_server
from tokenloom.server.config import ServerConfig

__all__ = ["ServerConfig", "build_app", "run_server"]
