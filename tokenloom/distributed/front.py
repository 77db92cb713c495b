"""The one public endpoint in front of the replicas: it routes each request (`ReplicaRouter`), relays the
replica's answer as it comes (streams included), retries a request on another replica when its replica failed
before sending anything, ends a stream cut by a failure with an error event, and serves `/health` and a
`/metrics` that holds every replica's metrics under a `replica` label plus the router's own.

The API key and the body limit are checked here; replicas take only the front's internal key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

import tokenloom
from tokenloom.distributed.metrics import merged_metrics
from tokenloom.distributed.replica_set import ReplicaSet
from tokenloom.distributed.router import ReplicaRouter, ReplicaUnavailable
from tokenloom.server.errors import error_body
from tokenloom.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from tokenloom.server.request_handling import sse
from tokenloom.server.tokenization import TokenizerPool

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0  # how often replicas' /health is polled
# Request headers not passed to a replica (the front's own connection, and the client's key).
_DROP_REQUEST = {"host", "content-length", "authorization", "connection", "keep-alive", "transfer-encoding"}
_DROP_RESPONSE = {"content-length", "connection", "keep-alive", "transfer-encoding", "date", "server"}
_ROUTED_PATHS = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}


@dataclass
class Front:
    """What the front's routes share: the replicas, the router, and the default model's tokenizer (routing
    keys are its token ids)."""

    replicas: ReplicaSet
    router: ReplicaRouter
    tokenizer: TokenizerPool | None
    model_name: str | None
    client: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=None))
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def replica_failed(self, replica: int) -> None:
        """Stop routing to a replica whose connection failed, and wait in the background for Ray's restart."""
        if not self.router.healthy[replica]:
            return
        logger.warning("replica %d failed; routing around it until it is back", replica)
        self.router.mark_down(replica)
        task = asyncio.get_running_loop().create_task(self._revive(replica))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _revive(self, replica: int) -> None:
        while True:
            try:
                url = await self.replicas.revive(replica)
                if (await self.client.get(f"{url}/health", timeout=5.0)).status_code == 200:
                    self.replicas.urls[replica] = url
                    self.router.mark_up(replica)
                    logger.info("replica %d is back at %s", replica, url)
                    return
            except Exception:  # still restarting
                logger.debug("replica %d not back yet", replica, exc_info=True)
            await asyncio.sleep(0.5)

    async def route_ids(self, path: str, body: bytes) -> list[int] | None:
        """The token ids a completion's or chat's prompt starts with (the routing key), or None."""
        field_name = _ROUTED_PATHS.get(path)
        if field_name is None or self.tokenizer is None:
            return None
        try:
            request = json.loads(body)
            if not isinstance(request, dict) or request.get("model") not in (None, self.model_name):
                return None
            value = request.get(field_name)
            if field_name == "messages":
                return await self.tokenizer.encode_chat(value) if isinstance(value, list) else None
            if isinstance(value, list) and value and not isinstance(value[0], int):
                value = value[0]  # a batch of prompts: the first one's prefix
            if isinstance(value, str):
                return await self.tokenizer.encode(value)
            return value if isinstance(value, list) and all(isinstance(t, int) for t in value) else None
        except Exception:  # an invalid body: the replica answers it
            return None


def build_front_app(front: Front, api_key: str | None, max_body_bytes: int, body_timeout: float) -> FastAPI:
    """The public app: `/health`, `/metrics`, and every other path relayed to a replica."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(_watch(front))
        try:
            yield
        finally:
            watcher.cancel()
            await front.client.aclose()

    app = FastAPI(title="tokenloom", version=tokenloom.__version__, lifespan=lifespan, openapi_url=None)

    @app.get("/health")
    async def health() -> Response:
        up = [i for i, ok in enumerate(front.router.healthy) if ok]
        status = {"status": "ok" if up else "no replica is up", "replicas_up": len(up),
                  "replicas": len(front.router.healthy)}
        return JSONResponse(status, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        texts = await asyncio.gather(*(_replica_metrics(front, i) for i in range(len(front.replicas.urls))))
        return Response(merged_metrics(front.router, texts), media_type=CONTENT_TYPE_LATEST)

    @app.get("/replicas")
    async def replicas() -> Response:
        """Each replica: where it listens, whether it takes requests, what the router sent it, its process."""
        r = front.router
        pids = await asyncio.gather(*(_pid(front, i) for i in range(r.num_replicas)))
        return JSONResponse({"routing": r.policy, "replicas": [
            {"replica": i, "url": front.replicas.urls[i], "up": r.healthy[i], "in_flight": r.in_flight[i],
             "routed": r.stats.routed[i], "affinity_hits": r.stats.affinity_hits[i], "pid": pids[i]}
            for i in range(r.num_replicas)]})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def relay(request: Request, path: str) -> Response:
        try:
            return await _relay(front, request)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it

    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, timeout=body_timeout)
    return app


async def _relay(front: Front, request: Request) -> Response:
    """Send the request to a replica and its answer back; on a replica that fails before answering, the next
    one. A stream's first chunk is awaited before the client sees anything, so a failure until then is retried
    too."""
    body = await request.body()
    path = request.url.path
    key = await front.route_ids(path, body)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
    headers["authorization"] = f"Bearer {front.replicas.internal_key}"
    failed: set[int] = set()
    while True:
        try:
            replica = front.router.choose(key, frozenset(failed))
        except ReplicaUnavailable as exc:
            return JSONResponse(error_body(503, f"{exc}; retry shortly", code="replica_unavailable"),
                                status_code=503, headers={"retry-after": "1"})
        front.router.begin(replica)
        url = f"{front.replicas.urls[replica]}{path}"
        upstream_request = front.client.build_request(request.method, url, params=request.query_params,
                                                      headers=headers, content=body)
        try:
            upstream, first, chunks = await _first_answer(request, front.client, upstream_request)
        except httpx.TransportError:
            front.router.end(replica)
            front.replica_failed(replica)
            failed.add(replica)
            continue
        except BaseException:  # the client left (or the front stops): the replica sees its connection close
            front.router.end(replica)
            raise
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
        out_headers["x-tokenloom-replica"] = str(replica)
        return StreamingResponse(_forward(front, replica, upstream, first, chunks), status_code=upstream.status_code,
                                 headers=out_headers)


class ClientGone(Exception):
    """The client disconnected before the replica's first byte."""


async def _first_answer(request: Request, client: httpx.AsyncClient, upstream_request: httpx.Request
                        ) -> tuple[httpx.Response, bytes, AsyncIterator[bytes]]:
    """The replica's response with its first bytes (a whole answer, unless streamed), unless the client leaves
    first: then ClientGone, and the replica's connection is closed, which aborts the request there (a request
    whose client has gone is not computed on)."""
    answer = asyncio.ensure_future(_open(client, upstream_request))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        answer.cancel()
        raise
    finally:
        gone.cancel()
    if not answer.done():
        answer.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await answer
        raise ClientGone
    return answer.result()


async def _open(client: httpx.AsyncClient, upstream_request: httpx.Request
                ) -> tuple[httpx.Response, bytes, AsyncIterator[bytes]]:
    upstream = await client.send(upstream_request, stream=True)
    try:
        chunks = upstream.aiter_raw()
        return upstream, await anext(chunks, b""), chunks
    except BaseException:
        await upstream.aclose()
        raise


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


async def _forward(front: Front, replica: int, upstream: httpx.Response, first: bytes,
                   chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The replica's bytes as they come; if the replica fails mid-way, a stream ends with an error event."""
    try:
        if first:
            yield first
        async for chunk in chunks:
            yield chunk
    except httpx.TransportError:
        front.replica_failed(replica)
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            error = error_body(500, f"replica {replica} failed while streaming; the output is incomplete",
                               code="replica_failed")
            yield (sse(error) + sse("[DONE]")).encode()
    finally:
        await upstream.aclose()
        front.router.end(replica)


async def _pid(front: Front, replica: int) -> int | None:
    if not front.router.healthy[replica]:
        return None
    try:
        return await asyncio.wait_for(front.replicas.pid(replica), timeout=5.0)
    except Exception:  # restarting
        return None


async def _replica_metrics(front: Front, replica: int) -> str:
    if not front.router.healthy[replica]:
        return ""
    with contextlib.suppress(httpx.HTTPError):
        return (await front.client.get(f"{front.replicas.urls[replica]}/metrics", timeout=5.0)).text
    return ""


async def _watch(front: Front) -> None:
    """Notice replicas that died while idle (a request would also notice, and be retried elsewhere)."""
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        for replica, url in enumerate(list(front.replicas.urls)):
            if not front.router.healthy[replica]:
                continue
            try:
                ok = (await front.client.get(f"{url}/health", timeout=5.0)).status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                front.replica_failed(replica)


def serve_replicas(config: Any, model: str | None, engine_options: dict[str, Any],
                   sock: socket.socket | None = None) -> int:
    """`tokenloom serve --replicas N`: start the replicas on Ray, then serve the front until SIGINT/SIGTERM on
    `sock` (the address bound before Ray starts, `bind_server_socket`; bound here first when not given)."""
    import dataclasses

    import uvicorn

    from tokenloom.config import EngineConfig
    from tokenloom.loader import load_tokenizer
    from tokenloom.server.app import bind_server_socket, log_address
    from tokenloom.server.http_protocol import GuardedH11Protocol

    sock = sock if sock is not None else bind_server_socket(config.host, config.port)
    server_options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    name = config.served_model_name or model
    tokenizer = None
    block_size = 16
    if model is not None:
        engine_config = EngineConfig.from_kwargs(model=model, **engine_options)
        tokenizer = TokenizerPool(load_tokenizer(engine_config.model_config))
        block_size = engine_config.cache_config.block_size
    device = EngineConfig.from_kwargs(**engine_options).device_config.torch_device()
    replicas = ReplicaSet.start(config.replicas, server_options, model, engine_options, config.ray_address,
                                num_gpus=1.0 if device.type == "cuda" else 0.0)
    try:
        router = ReplicaRouter(config.replicas, config.routing, block_size=block_size)
        app = build_front_app(Front(replicas, router, tokenizer, name), config.api_key, config.max_body_bytes,
                              config.body_timeout)
        uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                   http=GuardedH11Protocol.configure(config.header_timeout, config.max_connections))
        log_address(sock)
        uvicorn.Server(uv_config).run(sockets=[sock])
    finally:
        sock.close()
        replicas.shutdown()
        if tokenizer is not None:
            tokenizer.close()
    return 0
