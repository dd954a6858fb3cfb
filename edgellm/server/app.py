"""The application: one object that owns the model's Batcher, the metrics and the routes, each route a method."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import EdgeLLMError
from ..metrics import Metrics
from ..runtime.batch import QueueFull, Request
from ..runtime.model import GenerationResult
from . import ollama
from . import responses as responses_api
from .pool import ModelPool, PoolBusy, ServedModel
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
    logprobs_of,
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


@dataclass
class Reply:
    """A request's answers in the making: one Batcher request per choice (n), and what each has reported."""

    job: Job
    served: ServedModel
    arrivals: asyncio.Queue  # (choice, kind, value) from the Batcher
    handles: list[Request] = field(default_factory=list)
    logprobs_sent: list[int] = field(init=False)  # per choice: tokens whose logprobs went out, and the length of
    logprobs_offset: list[int] = field(init=False)  # their text

    def __post_init__(self):
        self.logprobs_sent = [0] * self.job.n
        self.logprobs_offset = [0] * self.job.n

    def cancel(self, pool: ModelPool) -> None:
        batcher = pool.batcher(self.served)
        for handle in self.handles:
            batcher.cancel(handle)


class OpenAIServer:
    """Serves the models of `pool` (pool.py; or one loaded `model` under the id `name`): POST /v1/chat/completions
    and /v1/completions, GET /v1/models, /health, /metrics and / (the chat page). A request's "model" picks one
    (none: the first); as many answers decode together as its engine has slots, the rest wait in a queue of at most
    `max_queue`; `prompt_cache`: a PromptCache that finished sequences go to and new prompts start from."""

    def __init__(self, model=None, name: str = "", max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_queue: int = MAX_QUEUE, prompt_cache=None, pool: ModelPool | None = None):
        if pool is None:
            one = ServedModel(name, lambda: (model, prompt_cache), path=model.bundle.path)
            one.model, one.prompt_cache = model, prompt_cache
            pool = ModelPool([one], max_queue=max_queue)
        self.pool, self.name = pool, pool.names()[0]
        pool.max_queue, pool.on_finished = max_queue, self.finished
        self.max_request_bytes, self.max_queue = max_request_bytes, max_queue
        self.metrics = Metrics()
        self.html = PAGE.read_text(encoding="utf-8")

    def finished(self, request: Request, outcome: str) -> None:
        """A request left a Batcher (on its thread): one log line, counted."""
        job, result = cast(Job, request.tag), request.answer.result
        started = request.prefilled_chunks > 0
        if outcome == "stopped" and not started:
            log.info(f"{job.id} dropped: the client left while it waited")
            self.metrics.finished("dropped")
            return
        text = {"stopped": "stopped, the client left", "error": "failed"}.get(outcome, outcome)
        log.info(log_line(job, result if started else None, text))
        self.metrics.finished(outcome, result if started else None)

    def queued(self) -> int:
        return sum(m.batcher.queued for m in self.pool.loaded() if m.batcher is not None)

    def full(self) -> bool:
        return self.queued() >= self.max_queue

    # --- helpers of the routes ----------------------------------------------------------------------------------
    @staticmethod
    def error(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error",
              headers: dict | None = None):
        return JSONResponse(error_body(message, param, kind), status, headers=headers)

    def busy(self, why: str | None = None, error=None):
        self.metrics.finished("busy")
        response = (error or self.error)(why or f"the server is busy: {self.queued()} requests are waiting for the "
                                         "model; retry shortly", 503, None, "server_busy")
        response.headers["Retry-After"] = "2"
        return response

    def served(self) -> list[str]:
        """The model ids requests may name: each model's, and NAME:ADAPTER for each LoRA adapter a loaded one has."""
        ids = []
        for served in self.pool.models.values():
            ids.append(served.name)
            if served.model is not None:
                ids += [f"{served.name}:{adapter}" for adapter in served.model.engine.adapters]
        return ids

    def pick(self, asked) -> tuple[str, str | None]:
        """(model name, LoRA adapter or None) of a request's "model"; BadRequest (404) if none is served."""
        if asked in (None, ""):
            return self.name, None
        if isinstance(asked, str) and asked in self.pool.models:
            return asked, None
        if isinstance(asked, str) and asked.endswith(":latest") and asked[:-7] in self.pool.models:
            return asked[:-7], None  # ollama's tag for a model named without one
        base, _, adapter = asked.rpartition(":") if isinstance(asked, str) else ("", "", "")
        if base in self.pool.models and adapter:
            model = self.pool.models[base].model
            if model is None or adapter in model.engine.adapters:
                return base, adapter  # an unloaded model's adapters are checked once it is loaded
        raise BadRequest(not_served(asked, self.served()), "model", status=404)

    def start(self, body, chat: bool, arrivals: asyncio.Queue, deliver) -> Reply:
        """Check the request, make its answers (n of them) ready to prefill and queue them, their pieces going to
        `arrivals` through `deliver(choice, kind, value)` (a worker thread: the model may have to be loaded, and
        tokenizing, images and the schema take time)."""
        name, adapter = self.pick(body.get("model") if isinstance(body, dict) else None)
        with self.pool.use(name) as served:
            model = served.ready
            job = parse(model, body, chat)
            job.model = f"{name}:{adapter}" if adapter else name
            batcher, reply = self.pool.batcher(served), Reply(job, served, arrivals)
            try:
                for i in range(job.n):
                    sampling = dict(job.sampling)
                    if i > 0:  # each choice its own constraint state and its own draws
                        sampling["json_schema"] = job.schema
                        sampling["seed"] = None if sampling.get("seed") is None else sampling["seed"] + i
                    answer = model.start(job.prompt, max_new_tokens=job.max_tokens, started=job.arrived,
                                         adapter=adapter, **sampling)
                    reply.handles.append(batcher.submit(answer, functools.partial(deliver, i), job.arrived, tag=job))
            except BaseException:
                reply.cancel(self.pool)
                raise
        return reply

    @staticmethod
    def logprobs(reply: Reply, index: int):
        """The logprobs of choice `index`'s tokens not reported yet (all of an unstreamed answer's)."""
        job = reply.job
        if job.logprobs is None:
            return None
        result = reply.handles[index].answer.result
        entries = (result.logprobs or [])[reply.logprobs_sent[index]:len(result.token_ids)]
        if not entries and job.stream:
            return None
        tokenizer = reply.served.ready.tokenizer

        def text_of(token: int) -> str:
            return tokenizer.decode([token], skip_special_tokens=False)

        body = logprobs_of(job, entries, text_of, reply.logprobs_offset[index])
        reply.logprobs_sent[index] += len(entries)
        reply.logprobs_offset[index] += sum(len(text_of(token)) for token, _, _ in entries)
        return body

    def model_card(self, served_id: str) -> dict:
        name, _ = self.pick(served_id)
        return {"id": served_id, "object": "model", "owned_by": "edgellm", **self.pool.models[name].card()}

    # --- the routes ---------------------------------------------------------------------------------------------
    async def admit(self, request, translate, error=None) -> tuple[Reply, object] | Response:
        """A request of any of the APIs, read, put in OpenAI's shape by `translate(body) -> (request, chat)`, checked
        and queued: (its Reply, the body as sent); or the error response, written by `error(message, status, param,
        kind)` (OpenAI's shape by default)."""
        error = error or self.error
        if self.full():  # before reading the body
            return self.busy(error=error)
        loop = asyncio.get_running_loop()
        arrivals: asyncio.Queue = asyncio.Queue()

        def deliver(index: int, kind: str, value) -> None:  # on the Batcher's thread
            loop.call_soon_threadsafe(arrivals.put_nowait, (index, kind, value))

        chat = False
        try:
            body = await read_json(request, self.max_request_bytes)
            asked, chat = translate(body)
            reply = await run_in_threadpool(self.start, asked, chat, arrivals, deliver)
        except BadRequest as e:
            self.metrics.finished("refused")
            return error(str(e), e.status, e.param, "not_found_error" if e.status == 404 else "invalid_request_error")
        except EdgeLLMError as e:
            self.metrics.finished("refused")
            return error(str(e), 400, "messages" if chat else "prompt", "invalid_request_error")
        except QueueFull:  # it filled while this request was read and checked
            return self.busy(error=error)
        except PoolBusy as e:
            return self.busy(str(e), error=error)
        return reply, body

    async def complete(self, request, chat: bool):
        admitted = await self.admit(request, lambda body: (body, chat))
        if isinstance(admitted, Response):
            return admitted
        reply, _ = admitted
        if reply.job.stream:
            return StreamingResponse(self.events(reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.answer(request, reply)

    async def gather(self, request, reply: Reply) -> list[GenerationResult] | str | None:
        """All of an unstreamed reply's results in choice order; an error's message; or None when the client left
        (the answers stop: nobody will read them)."""
        loop, job = asyncio.get_running_loop(), reply.job
        results: dict[int, GenerationResult] = {}
        try:
            check_at = loop.time() + DISCONNECT_CHECK_S
            while len(results) < job.n:
                try:
                    index, kind, value = await asyncio.wait_for(reply.arrivals.get(), DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    kind = None
                if kind == "done":
                    results[index] = value
                if kind == "error":
                    reply.cancel(self.pool)
                    return str(value)
                if loop.time() >= check_at:
                    if await request.is_disconnected():
                        reply.cancel(self.pool)
                        return None
                    check_at = loop.time() + DISCONNECT_CHECK_S
        except BaseException:
            reply.cancel(self.pool)
            raise
        return [results[i] for i in range(job.n)]

    async def answer(self, request, reply: Reply):
        """An unstreamed answer, whole (all its choices); it stops if its client leaves while it is written."""
        job = reply.job
        results = await self.gather(request, reply)
        if results is None:
            return Response(status_code=499)
        if isinstance(results, str):
            return self.error(results, param="messages" if job.chat else "prompt")
        choices = []
        for i, result in enumerate(results):
            text = (result.text or None) if result.tool_calls else result.text  # calls alone: content null
            choices.append(choice(job, text, result.finish_reason, calls=result.tool_calls,
                                  logprobs=self.logprobs(reply, i), index=i))
        return JSONResponse(envelope(job, False, choices=choices, usage=usage(results), timings=timings(results[0])))

    async def events(self, reply: Reply):
        """A streamed answer's server-sent events (choices interleaved, each chunk naming its index); the answer
        stops if the stream is closed."""
        job = reply.job
        results: dict[int, GenerationResult] = {}
        try:
            if job.chat:
                for i in range(job.n):
                    yield event(job, choices=[choice(job, None, None, first=True, index=i)])
            while len(results) < job.n:
                index, kind, value = await reply.arrivals.get()
                if kind == "piece":
                    yield event(job, choices=[choice(job, value, None, logprobs=self.logprobs(reply, index),
                                                     index=index)])
                elif kind == "error":
                    reply.cancel(self.pool)
                    yield error_event(value)
                    return
                else:
                    result = results[index] = value
                    if result.tool_calls:  # each call whole, in one chunk (OpenAI streams the same fields in pieces)
                        calls = [{"index": i, **call} for i, call in enumerate(result.tool_calls)]
                        yield event(job, choices=[{"index": index, "delta": {"tool_calls": calls},
                                                   "finish_reason": None, "logprobs": None}])
                    yield event(job, choices=[choice(job, None, result.finish_reason,
                                                     logprobs=self.logprobs(reply, index), index=index)],
                                timings=timings(result))
        except BaseException:  # the client went away (the stream was cancelled or closed)
            reply.cancel(self.pool)
            raise
        if job.include_usage:
            yield event(job, choices=[], usage=usage([results[i] for i in range(job.n)]))
        yield "data: [DONE]\n\n"

    # --- tokens -------------------------------------------------------------------------------------------------
    def tokens_of(self, body) -> dict:
        """/tokenize (a worker thread: the model may have to be loaded): "content" or "prompt" (text, llama.cpp's
        and vLLM's names) or "messages" (through the chat template, as a chat request's prompt);
        "add_special" / "add_special_tokens" (default true for text); "with_pieces" adds each token's text."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        name, _ = self.pick(body.get("model"))
        with self.pool.use(name) as served:
            model = served.ready
            text = body.get("content", body.get("prompt"))
            special = body.get("add_special", body.get("add_special_tokens", True))
            if not isinstance(special, bool):
                raise BadRequest("'add_special' must be true or false", "add_special")
            if isinstance(text, str):
                check = model.prepare(text, raw=True)  # the size and Unicode checks of every prompt
                ids = check.ids if special else model.tokenizer.encode(text, add_special_tokens=False)
            elif body.get("messages") is not None:
                ids = parse(model, {"messages": body["messages"], "max_tokens": 1}, True).prompt.ids
            else:
                raise BadRequest("give 'content' (text) or 'messages' to tokenize", "content")
            out: dict = {"tokens": ids, "count": len(ids), "max_model_len": model.seq_length}
            if body.get("with_pieces"):
                out["tokens"] = [{"id": i, "piece": model.tokenizer.decode([i], skip_special_tokens=False)}
                                 for i in ids]
            return out

    def text_of(self, body) -> dict:
        """/detokenize: "tokens" (ids) -> their text, as "content" (llama.cpp) and "prompt" (vLLM)."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        name, _ = self.pick(body.get("model"))
        ids = body.get("tokens")
        with self.pool.use(name) as served:
            model = served.ready
            vocab = model.manifest.model.vocab_size
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                                    for i in ids):
                raise BadRequest(f"'tokens' must be a list of token ids, 0 to {vocab - 1}", "tokens")
            text = model.tokenizer.decode(ids, skip_special_tokens=False)
        return {"content": text, "prompt": text}

    async def token_route(self, request, work):
        try:
            body = await read_json(request, self.max_request_bytes)
            return JSONResponse(await run_in_threadpool(work, body))
        except BadRequest as e:
            return self.error(str(e), e.status, e.param,
                              "not_found_error" if e.status == 404 else "invalid_request_error")
        except EdgeLLMError as e:
            return self.error(str(e), 400, "content")
        except PoolBusy as e:
            return self.busy(str(e))

    async def tokenize(self, request):
        return await self.token_route(request, self.tokens_of)

    async def detokenize(self, request):
        return await self.token_route(request, self.text_of)

    # --- the Responses API ------------------------------------------------------------------------------------
    async def responses(self, request):
        admitted = await self.admit(request, lambda body: (responses_api.chat_request(body), True))
        if isinstance(admitted, Response):
            return admitted
        reply, body = admitted
        writer = responses_api.ResponseWriter(reply.job.model, body)
        if reply.job.stream:
            return StreamingResponse(self.response_events(reply, writer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await self.gather(request, reply)
        if results is None:
            return Response(status_code=499)
        if isinstance(results, str):
            return self.error(results, 500, kind="server_error")
        return JSONResponse(writer.response("completed", results[0]))

    async def response_events(self, reply: Reply, writer: responses_api.ResponseWriter):
        try:
            for line in writer.opening():
                yield line
            while True:
                _, kind, value = await reply.arrivals.get()
                if kind == "piece":
                    yield writer.delta(value)
                elif kind == "error":
                    reply.cancel(self.pool)
                    yield writer.failed(value)
                    return
                else:
                    for line in writer.closing(value):
                        yield line
                    return
        except BaseException:  # the client went away
            reply.cancel(self.pool)
            raise

    # --- the ollama API ---------------------------------------------------------------------------------------
    @staticmethod
    def ollama_error(message: str, status: int = 400, param: str | None = None, kind: str = "") -> JSONResponse:
        return JSONResponse({"error": message}, status)

    async def ollama_answer(self, request, route: str):
        """/api/chat and /api/generate: the request in OpenAI's shape through the same checks and batch."""

        def translate(body) -> tuple[dict, bool]:
            if route == "chat":
                return ollama.chat_request(body), True
            name, _ = self.pick(body.get("model") if isinstance(body, dict) else None)
            return ollama.generate_request(body, self.pool.models[name].card().get("chat_template", True))

        admitted = await self.admit(request, translate, error=self.ollama_error)
        if isinstance(admitted, Response):
            return admitted
        reply, _ = admitted
        as_chat = route == "chat"  # /api/generate answers as a completion, templated or not
        if reply.job.stream:
            return StreamingResponse(self.ollama_lines(reply, as_chat), media_type="application/x-ndjson")
        results = await self.gather(request, reply)
        if results is None:
            return Response(status_code=499)
        if isinstance(results, str):
            return self.ollama_error(results, 500)
        result = results[0]
        return JSONResponse(ollama.last(reply.job.model, as_chat, result, ollama.elapsed(reply.job.arrived),
                                        result.text))

    async def ollama_lines(self, reply: Reply, chat: bool):
        """A streamed ollama answer: one JSON object per line, the last with done: true and the timings."""
        job = reply.job
        try:
            while True:
                _, kind, value = await reply.arrivals.get()
                if kind == "piece":
                    yield json.dumps(ollama.piece(job.model, chat, value), ensure_ascii=False) + "\n"
                elif kind == "error":
                    reply.cancel(self.pool)
                    yield json.dumps({"error": value}) + "\n"
                    return
                else:
                    yield json.dumps(ollama.last(job.model, chat, value, ollama.elapsed(job.arrived)),
                                     ensure_ascii=False) + "\n"
                    return
        except BaseException:  # the client went away
            reply.cancel(self.pool)
            raise

    async def ollama_chat(self, request):
        return await self.ollama_answer(request, "chat")

    async def ollama_generate(self, request):
        return await self.ollama_answer(request, "generate")

    async def ollama_tags(self, request):
        models = self.pool.models.values()
        return JSONResponse({"models": [ollama.tag(m.name, m.card(), m.size()) for m in models]})

    async def ollama_running(self, request):
        return JSONResponse({"models": [{**ollama.tag(m.name, m.card(), m.size()), "expires_at": ollama.now(),
                                         "size_vram": 0} for m in self.pool.loaded()]})

    async def ollama_show(self, request):
        try:
            body = await read_json(request, self.max_request_bytes)
            name, _ = self.pick((body.get("model") or body.get("name")) if isinstance(body, dict) else None)
        except BadRequest as e:
            return self.ollama_error(str(e), e.status)
        served = self.pool.models[name]
        return JSONResponse(ollama.show(served.card(), served.template()))

    async def ollama_version(self, request):
        return JSONResponse({"version": ollama.VERSION})

    async def chat_completions(self, request):
        return await self.complete(request, chat=True)

    async def completions(self, request):
        return await self.complete(request, chat=False)

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self.model_card(one) for one in self.served()]})

    async def one_model(self, request):
        asked = request.path_params["model"]
        if asked not in self.served():
            return self.error(not_served(asked, self.served()), 404, "model", kind="not_found_error")
        return JSONResponse(self.model_card(asked))

    async def prometheus(self, request):
        loaded = self.pool.loaded()
        batchers = [m.batcher for m in loaded if m.batcher is not None]
        caches = [m.prompt_cache for m in loaded if m.prompt_cache is not None]
        steps = sum(b.steps for b in batchers)
        gauges = {"queue_length": (self.queued(), "Requests waiting for a free slot."),
                  "running": (sum(b.busy for b in batchers), "Requests holding a slot (prefilling or decoding)."),
                  "slots": (sum(len(m.ready.engine.slots) for m in loaded),
                            "Answers that can decode together (--parallel), over the loaded models."),
                  "models_loaded": (len(loaded), f"Models loaded, of the {len(self.pool.models)} served.")}
        if steps:
            gauges["batch_mean"] = (sum(b.batched_tokens for b in batchers) / steps, "Mean answers per decode step.")
        if caches:
            gauges["prompt_cache_bytes"] = (sum(c.nbytes for c in caches), "Memory the prompt caches hold.")
            gauges["prompt_cache_entries"] = (sum(len(c) for c in caches), "Sequences in the prompt caches.")
        return PlainTextResponse(self.metrics.text(gauges), media_type="text/plain; version=0.0.4")

    async def health(self, request):
        return JSONResponse({"status": "ok", "model": self.name, "models": self.pool.names(),
                             "loaded": [m.name for m in self.pool.loaded()]})

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
        for served in self.pool.loaded():  # streams still running were given their grace time by the server
            try:
                served.unload()
            except EdgeLLMError as e:  # the prompt cache could not be saved
                log.warning(str(e))

    def asgi(self):
        """The Starlette application of these routes."""
        routes = [Route("/", self.page), Route("/health", self.health), Route("/metrics", self.prometheus),
                  Route("/v1/models", self.models), Route("/v1/models/{model:path}", self.one_model),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/responses", self.responses, methods=["POST"]),
                  Route("/tokenize", self.tokenize, methods=["POST"]),
                  Route("/detokenize", self.detokenize, methods=["POST"]),
                  Route("/api/chat", self.ollama_chat, methods=["POST"]),
                  Route("/api/generate", self.ollama_generate, methods=["POST"]),
                  Route("/api/tags", self.ollama_tags), Route("/api/ps", self.ollama_running),
                  Route("/api/show", self.ollama_show, methods=["POST"]), Route("/api/version", self.ollama_version)]
        return Starlette(routes=routes, exception_handlers={HTTPException: self.http_error,
                                                            Exception: self.server_error},
                         lifespan=self.lifespan)


def create_app(model=None, name: str = "", max_request_bytes: int = MAX_REQUEST_BYTES, api_key: str | None = None,
               max_queue: int = MAX_QUEUE, prompt_cache=None, pool: ModelPool | None = None):
    """The ASGI application serving `model` under the id `name`, or the models of `pool` (OpenAIServer); with
    `api_key`, every route but /health needs it (`Authorization: Bearer KEY`, as OpenAI clients send it; the chat
    page takes `?api_key=KEY`)."""
    app = OpenAIServer(model, name, max_request_bytes, max_queue, prompt_cache, pool).asgi()
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
