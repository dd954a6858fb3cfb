"""The application: one object that owns the model's Batcher, the metrics and the routes, each route a method."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from pathlib import Path
from typing import cast

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import EdgeLLMError
from ..metrics import Metrics
from ..runtime.batch import Batcher, QueueFull, Request
from .protocol import (
    MAX_REQUEST_BYTES,
    BadRequest,
    Job,
    choice,
    envelope,
    error_body,
    error_event,
    event,
    log_line,
    not_served,
    parse,
    read_json,
    timings,
    usage,
)

PAGE = Path(__file__).parent.parent / "server_page.html"
MAX_QUEUE = 64  # requests waiting for the model beyond this get a 503 with Retry-After
DISCONNECT_CHECK_S = 0.25  # how often an unstreamed answer checks that its client is still there
log = logging.getLogger("edgellm.server")  # one line per request; `edgellm serve` prints it


class OpenAIServer:
    """Serves `model` under the id `name`: POST /v1/chat/completions and /v1/completions, GET /v1/models, /health,
    /metrics and / (the chat page). As many answers decode together as the model's engine has slots; the rest wait
    in a queue of at most `max_queue`; `prompt_cache`: a PromptCache that finished sequences go to and new prompts
    start from."""

    def __init__(self, model, name: str, max_request_bytes: int = MAX_REQUEST_BYTES, max_queue: int = MAX_QUEUE,
                 prompt_cache=None):
        self.model, self.name = model, name
        self.max_request_bytes, self.max_queue, self.prompt_cache = max_request_bytes, max_queue, prompt_cache
        self.metrics = Metrics()
        self._batcher: Batcher | None = None  # started with the first request (serving nothing starts no thread)
        self.html = PAGE.read_text(encoding="utf-8")

    # --- the Batcher --------------------------------------------------------------------------------------------
    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:
            self._batcher = Batcher(self.model, self.prompt_cache, self.max_queue, on_finished=self.finished)
        return self._batcher

    def finished(self, request: Request, outcome: str) -> None:
        """A request left the Batcher (on its thread): one log line, counted."""
        job, result = cast(Job, request.tag), request.answer.result
        started = request.prefilled_chunks > 0
        if outcome == "stopped" and not started:
            log.info(f"{job.id} dropped: the client left while it waited")
            self.metrics.finished("dropped")
            return
        text = {"stopped": "stopped, the client left", "error": "failed"}.get(outcome, outcome)
        log.info(log_line(job, result if started else None, text))
        self.metrics.finished(outcome, result if started else None)

    def full(self) -> bool:
        return self._batcher is not None and self._batcher.queued >= self.max_queue

    # --- helpers of the routes ----------------------------------------------------------------------------------
    @staticmethod
    def error(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error",
              headers: dict | None = None):
        return JSONResponse(error_body(message, param, kind), status, headers=headers)

    def busy(self):
        self.metrics.finished("busy")
        queued = self._batcher.queued if self._batcher is not None else 0
        return self.error(f"the server is busy: {queued} requests are waiting for the model; retry shortly", 503,
                          kind="server_busy", headers={"Retry-After": "2"})

    def served(self) -> list[str]:
        """The model ids requests may name: the bundle's, and NAME:ADAPTER for each loaded LoRA adapter."""
        return [self.name, *(f"{self.name}:{adapter}" for adapter in self.model.engine.adapters)]

    def adapter_of(self, asked) -> str | None:
        return asked.split(":", 1)[1] if isinstance(asked, str) and asked.startswith(f"{self.name}:") else None

    def start(self, body, chat: bool, adapter: str | None = None):
        """Check the request and make its answer ready to prefill (a thread: tokenizing, images, the schema)."""
        job = parse(self.model, body, chat)
        job.model = f"{self.name}:{adapter}" if adapter else self.name
        answer = self.model.start(job.prompt, max_new_tokens=job.max_tokens, started=job.arrived, adapter=adapter,
                                  **job.sampling)
        return job, answer

    def model_card(self, served_id: str) -> dict:
        model = self.model
        return {"id": served_id, "object": "model", "created": int(model.bundle.path.stat().st_mtime),
                "owned_by": "edgellm", "context_length": model.seq_length, "vision": model.vision is not None,
                "chat_template": model.chat_template is not None, "defaults": model.sampling_defaults()}

    # --- the routes ---------------------------------------------------------------------------------------------
    async def complete(self, request, chat: bool):
        if self.full():  # before reading the body
            return self.busy()
        try:
            body = await read_json(request, self.max_request_bytes)
            asked = body.get("model") if isinstance(body, dict) else None
            if asked not in (None, "", *self.served()):
                raise BadRequest(not_served(asked, self.name), "model", status=404)
            job, answer = await run_in_threadpool(self.start, body, chat, self.adapter_of(asked))
        except BadRequest as e:
            self.metrics.finished("refused")
            return self.error(str(e), e.status, param=e.param,
                              kind="not_found_error" if e.status == 404 else "invalid_request_error")
        except EdgeLLMError as e:
            self.metrics.finished("refused")
            return self.error(str(e), param="messages" if chat else "prompt")
        loop = asyncio.get_running_loop()
        arrivals: asyncio.Queue = asyncio.Queue()

        def deliver(kind: str, value) -> None:  # on the Batcher's thread
            loop.call_soon_threadsafe(arrivals.put_nowait, (kind, value))

        try:
            handle = self.batcher.submit(answer, deliver, job.arrived, tag=job)
        except QueueFull:  # it filled while this request was read and checked
            return self.busy()
        if job.stream:
            return StreamingResponse(self.events(job, handle, arrivals), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.answer(request, job, handle, arrivals)

    async def answer(self, request, job: Job, handle: Request, arrivals: asyncio.Queue):
        """An unstreamed answer, whole; it stops if its client leaves while it is written."""
        loop = asyncio.get_running_loop()
        try:
            check_at = loop.time() + DISCONNECT_CHECK_S
            while True:
                try:
                    kind, value = await asyncio.wait_for(arrivals.get(), DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    kind = None
                if kind == "done":
                    result = value
                    break
                if kind == "error":
                    return self.error(value, param="messages" if job.chat else "prompt")
                if loop.time() >= check_at:
                    if await request.is_disconnected():  # nobody will read the answer: it stops
                        self.batcher.cancel(handle)
                        return Response(status_code=499)
                    check_at = loop.time() + DISCONNECT_CHECK_S
        except BaseException:
            self.batcher.cancel(handle)
            raise
        text = (result.text or None) if result.tool_calls else result.text  # calls alone: content null
        return JSONResponse(envelope(job, False, choices=[choice(job, text, result.finish_reason,
                                                                 calls=result.tool_calls)],
                                     usage=usage(result), timings=timings(result)))

    async def events(self, job: Job, handle: Request, arrivals: asyncio.Queue):
        """A streamed answer's server-sent events; the answer stops if the stream is closed."""
        try:
            if job.chat:
                yield event(job, choices=[choice(job, None, None, first=True)])
            while True:
                kind, value = await arrivals.get()
                if kind == "piece":
                    yield event(job, choices=[choice(job, value, None)])
                elif kind == "error":
                    yield error_event(value)
                    return
                else:
                    result = value
                    break
        except BaseException:  # the client went away (the stream was cancelled or closed)
            self.batcher.cancel(handle)
            raise
        if result.tool_calls:  # each call whole, in one chunk (OpenAI streams the same fields in pieces)
            calls = [{"index": i, **call} for i, call in enumerate(result.tool_calls)]
            yield event(job, choices=[{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": None,
                                       "logprobs": None}])
        yield event(job, choices=[choice(job, None, result.finish_reason)], timings=timings(result))
        if job.include_usage:
            yield event(job, choices=[], usage=usage(result))
        yield "data: [DONE]\n\n"

    async def chat_completions(self, request):
        return await self.complete(request, chat=True)

    async def completions(self, request):
        return await self.complete(request, chat=False)

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self.model_card(one) for one in self.served()]})

    async def one_model(self, request):
        asked = request.path_params["model"]
        if asked not in self.served():
            return self.error(not_served(asked, self.name), 404, "model", kind="not_found_error")
        return JSONResponse(self.model_card(asked))

    async def prometheus(self, request):
        b, cache = self._batcher, self.prompt_cache
        gauges = {"queue_length": (b.queued if b else 0, "Requests waiting for a free slot."),
                  "running": (b.busy if b else 0, "Requests holding a slot (prefilling or decoding)."),
                  "slots": (len(self.model.engine.slots), "Answers that can decode together (--parallel).")}
        if b and b.steps:
            gauges["batch_mean"] = (b.batched_tokens / b.steps, "Mean answers per decode step so far.")
        if cache is not None:
            gauges["prompt_cache_bytes"] = (cache.nbytes, "Memory the prompt cache holds.")
            gauges["prompt_cache_entries"] = (len(cache), "Sequences in the prompt cache.")
        return PlainTextResponse(self.metrics.text(gauges), media_type="text/plain; version=0.0.4")

    async def health(self, request):
        return JSONResponse({"status": "ok", "model": self.name})

    async def page(self, request):
        return HTMLResponse(self.html)

    async def http_error(self, request, exc):
        return self.error(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code,
                          kind="not_found_error" if exc.status_code == 404 else "invalid_request_error")

    async def server_error(self, request, exc: Exception):
        # a JSON body, as every other error has (the chat page and clients parse it); uvicorn logs the traceback
        return self.error(f"internal error: {type(exc).__name__}: {exc}", 500, kind="server_error")

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        yield
        if self._batcher is not None:  # streams still running were given their grace time by the server
            try:
                self._batcher.close()
            except EdgeLLMError as e:  # the prompt cache could not be saved
                log.warning(str(e))

    def asgi(self):
        """The Starlette application of these routes."""
        routes = [Route("/", self.page), Route("/health", self.health), Route("/metrics", self.prometheus),
                  Route("/v1/models", self.models), Route("/v1/models/{model:path}", self.one_model),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: self.http_error,
                                                            Exception: self.server_error},
                         lifespan=self.lifespan)


def create_app(model, name: str, max_request_bytes: int = MAX_REQUEST_BYTES, api_key: str | None = None,
               max_queue: int = MAX_QUEUE, prompt_cache=None):
    """The ASGI application serving `model` under the id `name` (OpenAIServer); with `api_key`, every route but
    /health needs it (`Authorization: Bearer KEY`, as OpenAI clients send it; the chat page takes `?api_key=KEY`)."""
    app = OpenAIServer(model, name, max_request_bytes, max_queue, prompt_cache).asgi()
    return app if api_key is None else KeyCheck(app, api_key)


class KeyCheck:
    """ASGI wrapper: every HTTP request but GET /health carries the API key, or gets OpenAI's 401."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or self._allowed(scope):
            return await self.app(scope, receive, send)
        body = {"error": {"message": "a valid API key is needed: Authorization: Bearer KEY (the chat page: "
                                     "/?api_key=KEY)", "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
        await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _allowed(self, scope) -> bool:
        from urllib.parse import parse_qs

        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        given = given[len(b"Bearer "):] if given[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if not given and scope["path"] == "/":
            given = (parse_qs(scope.get("query_string", b"").decode()).get("api_key") or [""])[0].encode()
        return hmac.compare_digest(given, self.key)
