"""OpenAI-compatible HTTP server over the async engine (FastAPI + uvicorn).

`tokenloom.server.app.build_state(config, specs, default)` makes the models and state, `build_app(state)`
the app; `run_server(state)` serves it. Nothing is
imported here, so that `tokenloom.server.config` stays cheap for the CLI.
"""
