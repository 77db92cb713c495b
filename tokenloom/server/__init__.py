"""OpenAI-compatible HTTP server over the async engine (FastAPI + uvicorn).

`tokenloom.server.app.build_app(engine, config)` makes the app; `run_server` serves it. Nothing is
imported here, so that `tokenloom.server.config` stays cheap for the CLI.
"""
