"""An OpenAI-compatible HTTP server for one bundle, with a chat page: `edgellm serve BUNDLE`.

POST /v1/chat/completions and /v1/completions (server-sent events when "stream" is true), GET /v1/models,
GET /health, GET /metrics and GET / (the page). Answers are written by a runtime.batch.Batcher: as many as the
engine has cache slots decode together, one graph call per step, the rest wait in a bounded queue; finished
sequences stay in the prompt cache, so a client that resends the history with a new turn prefills only that turn.
Requests are checked before anything runs; a bad one gets a 400 with an OpenAI-style error body that names the
field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import hmac
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeLLMError
from .metrics import Metrics
from .runtime.batch import Batcher, QueueFull
from .runtime.sampling import BOUNDS, Bound

PAGE = Path(__file__).with_name("server_page.html")
log = logging.getLogger("edgellm.server")  # one line per request; `edgellm serve` prints it

# OpenAI fields that would change the answer but that edgellm does not implement: refused rather than ignored.
UNSUPPORTED = {"functions": "the deprecated function calls (use 'tools')", "logprobs": "log-probabilities",
               "top_logprobs": "log-probabilities", "suffix": "suffix", "echo": "echo", "best_of": "best_of",
               "logit_bias": "logit_bias"}


# Characters that end a line for Python's str.splitlines, which clients such as httpx use to read server-sent
# events: inside an event's JSON they are escaped, so that no client cuts an event in two (JSON allows \uXXXX there)
LINE_BREAKING = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})
MAX_REQUEST_BYTES = 32 << 20  # a request body larger than this gets a 413 (images come base64-encoded inside)
MAX_QUEUE = 64  # requests waiting for the model beyond this get a 503 with Retry-After
SHUTDOWN_GRACE_S = 10  # on Ctrl-C / SIGTERM, streams still running after this are cancelled
DISCONNECT_CHECK_S = 0.25  # how often an unstreamed answer checks that its client is still there


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Job:
    """A checked request: what to prefill and how to sample."""

    prompt: object  # a runtime.model.Prompt
    max_tokens: int
    sampling: dict
    stream: bool
    include_usage: bool
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    model: str = ""  # the model id the answer names (the bundle's, or NAME:ADAPTER)


# The settings' bounds are SamplingParams' own, but for OpenAI's cap on temperature.
API_BOUNDS = {**BOUNDS, "temperature": Bound(0, 2)}



def event_json(value) -> str:
    """`value` as one line of JSON for a server-sent event (see LINE_BREAKING)."""
    return json.dumps(value, ensure_ascii=False).translate(LINE_BREAKING)


def _number(body: dict, name: str, bound: Bound):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if bound.integer else (int, float)):
        raise BadRequest(f"'{name}' must be {'an integer' if bound.integer else 'a number'}, got {value!r}", name)
    if not bound.allows(value):
        raise BadRequest(f"'{name}' must be {bound.describe()}, got {value}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false, got {value!r}", name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("'stop' must be a string or a list of non-empty strings", "stop")
    return stops


def _image_bytes(part: dict, where: str) -> bytes:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise BadRequest(f"{where}: an image_url part needs {{'image_url': {{'url': 'data:image/...;base64,...'}}}}",
                         "messages")
    if not url.startswith("data:"):
        raise BadRequest(f"{where}: only data: URLs (base64) are accepted; this server fetches nothing from the "
                         "network", "messages")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise BadRequest(f"{where}: the image data URL must be base64-encoded", "messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: the image data URL is not valid base64", "messages") from None


def _messages(body: dict) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages -> edgellm messages (image parts as {'type': 'image'}) and the images' bytes, in order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {'role': ..., 'content': ...}", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"{where} must be an object with a 'role' string and a 'content'", "messages")
        role, content = m["role"], m.get("content")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequest(f"{where}: role {role!r} is not supported (system, user, assistant or tool)", "messages")
        role = "system" if role == "developer" else role
        extra = _tool_fields(m, where)
        if isinstance(content, str) or (content is None and extra.get("tool_calls")):
            out.append({"role": role, "content": content, **extra})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"{where}: 'content' must be a string or a list of parts", "messages")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                images.append(_image_bytes(part, f"{where}.content[{j}]"))
                parts.append({"type": "image"})
            else:
                raise BadRequest(f"{where}.content[{j}]: parts must be {{'type': 'text', 'text': ...}} or "
                                 f"{{'type': 'image_url', ...}}, got {str(part)[:80]}", "messages")
        if all(p["type"] == "text" for p in parts):  # plain text: chat templates that expect strings stay happy
            parts = "".join(p["text"] for p in parts)
        out.append({"role": role, "content": parts, **extra})
    return out, images


def _tool_fields(message: dict, where: str) -> dict:
    """An assistant turn's tool_calls (their JSON arguments as objects, as chat templates read them) and a tool
    result's tool_call_id / name."""
    extra = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if message["role"] != "assistant" or not isinstance(calls, list):
            raise BadRequest(f"{where}: 'tool_calls' is a list, on an assistant message", "messages")
        extra["tool_calls"] = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise BadRequest(f"{where}: each tool call needs {{'function': {{'name': ..., 'arguments': ...}}}}",
                                 "messages")
            arguments = function.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError:
                    raise BadRequest(f"{where}: a tool call's 'arguments' is not valid JSON", "messages") from None
            extra["tool_calls"].append({"id": call.get("id"), "type": "function",
                                        "function": {"name": function["name"], "arguments": arguments}})
    for name in ("tool_call_id", "name"):
        if isinstance(message.get(name), str):
            extra[name] = message[name]
    return extra


def _response_format(model, value):
    """OpenAI's response_format -> generate()'s json_schema: None (text), or the compiled constraint of any JSON
    object or of the schema, compiled here so that a schema the grammar engine refuses is a 400 on this field."""
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        schema = True
    elif kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("'response_format' of type json_schema needs {'json_schema': {'name': ..., 'schema': "
                             "{...}}}", "response_format")
    else:
        raise BadRequest("'response_format' must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                         "'json_schema', 'json_schema': {...}}", "response_format")
    from .runtime.constraints import JsonConstraint, schema_of

    try:
        return JsonConstraint(model.grammar_tokenizer, schema_of(schema), model.manifest.model.vocab_size)
    except EdgeLLMError as e:
        raise BadRequest(str(e), "response_format") from None


def parse(model, body, chat: bool) -> Job:
    """Check an OpenAI request body against the model; raises BadRequest (or EdgeLLMError from the prompt)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}):
            raise BadRequest(f"'{name}' is not supported: edgellm does not implement {what}", name)
    if body.get("n", 1) != 1:
        raise BadRequest("'n' must be 1: one answer per request", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise BadRequest(f"'{name}' is not supported; use 'repetition_penalty' (1.0 = off)", name)
    json_schema = _response_format(model, body.get("response_format"))
    tools = None
    if chat:
        if model.chat_template is None:
            raise BadRequest("this bundle has no chat template (a base model): use /v1/completions", "messages")
        try:
            tools = model.tool_spec(body.get("tools"), body.get("tool_choice"))
        except EdgeLLMError as e:
            raise BadRequest(str(e), "tool_choice" if "tool_choice" in str(e) else "tools") from None
        if tools is not None and tools.choice != "auto" and json_schema is not None:
            raise BadRequest("a required tool call and 'response_format' do not combine", "tool_choice")
        messages, images = _messages(body)
        prompt = model.prepare(messages, images=images or None, tools=tools)
    else:
        for name in ("tools", "tool_choice"):
            if body.get(name) not in (None, [], "none"):
                raise BadRequest(f"'{name}' needs /v1/chat/completions", name)
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
            text = text[0]
        if not isinstance(text, str) or not text:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        prompt = model.prepare(text, raw=True)
    model.check_length(len(prompt.ids))
    room = model.seq_length - len(prompt.ids)
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _number(body, limit, Bound(1, 1 << 31, integer=True))
    if room < 1:
        raise BadRequest(f"the prompt is {len(prompt.ids)} tokens and fills the bundle's {model.seq_length}: no room "
                         "for an answer; shorten the conversation", "messages" if chat else "prompt")
    # No limit given: a chat answer may fill the context, a completion takes OpenAI's default of 16 tokens.
    max_tokens = min(asked or (room if chat else 16), room)
    sampling = model.sampling_defaults()
    for name, bound in API_BOUNDS.items():
        value = _number(body, name, bound)
        if value is not None:
            sampling[name] = value
    sampling["stop"] = _stops(body)
    sampling["json_schema"] = json_schema
    sampling["tools"] = tools
    sampling["ignore_eos"] = _flag(body, "ignore_eos")  # llama.cpp's extension: fixed-length answers
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return Job(prompt, max_tokens, sampling, _flag(body, "stream"), _flag(stream_options, "include_usage"), chat)


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": result.prompt_tokens + len(result.token_ids),
            "prompt_tokens_details": {"cached_tokens": result.reused_tokens}}


def timings(result) -> dict:
    """What the CLI's timing line says, as numbers (llama.cpp's server reports the same under 'timings')."""
    return {"prompt_tokens": result.prompt_tokens, "cached_tokens": result.reused_tokens,
            "ttft_ms": round(result.ttft_s * 1000, 1), "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 1),
            "decode_tokens_per_s": round(result.decode_tokens_per_s, 1), "images": result.images,
            "vision_ms": round(result.vision_s * 1000, 1)}


async def read_json(request, limit: int):
    """The request body as JSON, read no further than `limit` bytes."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/"):
        raise BadRequest(f"send the request body as JSON (Content-Type: application/json), not {kind.split(';')[0]}",
                         status=415)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body is {int(declared):,} bytes; this server takes at most {limit:,}",
                         status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(f"the request body is over {limit:,} bytes, the most this server takes", status=413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None


def not_served(asked, name: str) -> str:
    return f"model {asked!r} is not served here; this server serves {name!r}"


def log_line(job: Job, result, outcome: str) -> str:
    """What the log says of a request: its id, tokens (prompt, of them cached, completion), TTFT (of it, the wait
    for a free slot) and speed."""
    if result is None:
        return f"{job.id} {outcome} before its generation began"
    return (f"{job.id} {'chat' if job.chat else 'completion'}{' stream' if job.stream else ''} {outcome}: prompt "
            f"{result.prompt_tokens} tok ({result.reused_tokens} cached), {len(result.token_ids)} generated, TTFT "
            f"{result.ttft_s * 1000:.0f} ms ({result.queued_s * 1000:.0f} queued), decode "
            f"{result.decode_tokens_per_s:.1f} tok/s")


def create_app(model, name: str, max_request_bytes: int = MAX_REQUEST_BYTES, api_key: str | None = None,
               max_queue: int = MAX_QUEUE, prompt_cache=None):
    """The ASGI application serving `model` under the id `name`; with `api_key`, every route but /health needs it
    (`Authorization: Bearer KEY`, as OpenAI clients send it; the chat page takes `?api_key=KEY`). As many answers
    decode together as the model's engine has slots (Model(..., slots=N)); `prompt_cache`: a PromptCache that
    finished sequences go to and new prompts start from."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    metrics = Metrics()
    batchers: list[Batcher] = []  # started with the first request (an app that serves nothing starts no thread)

    def finished(request, outcome: str) -> None:
        """A request left the Batcher (on its thread): one log line, counted."""
        job, result = request.tag, request.answer.result
        started = request.prefilled_chunks > 0
        if outcome == "stopped" and not started:
            log.info(f"{job.id} dropped: the client left while it waited")
            metrics.finished("dropped")
            return
        text = {"stopped": "stopped, the client left", "error": "failed"}.get(outcome, outcome)
        log.info(log_line(job, result if started else None, text))
        metrics.finished(outcome, result if started else None)

    def batcher() -> Batcher:
        if not batchers:
            batchers.append(Batcher(model, prompt_cache, max_queue, on_finished=finished))
        return batchers[0]

    html = PAGE.read_text(encoding="utf-8")

    def error(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error",
              headers: dict | None = None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status,
                            headers=headers)

    def envelope(job: Job, piece: bool, **fields) -> dict:
        kind = ("chat.completion" + (".chunk" if piece else "")) if job.chat else "text_completion"
        return {"id": ("chatcmpl-" if job.chat else "cmpl-") + job.id, "object": kind, "created": job.created,
                "model": job.model, **fields}

    def choice(job: Job, text: str | None, finish: str | None, first: bool = False, calls=None) -> dict:
        if not job.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if not job.stream:
            message = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            return {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    def event(job: Job, **fields) -> str:
        return f"data: {event_json(envelope(job, True, **fields))}\n\n"

    def served() -> list[str]:
        """The model ids requests may name: the bundle's, and NAME:ADAPTER for each loaded LoRA adapter."""
        return [name, *(f"{name}:{adapter}" for adapter in model.engine.adapters)]

    def adapter_of(asked) -> str | None:
        return asked.split(":", 1)[1] if isinstance(asked, str) and asked.startswith(f"{name}:") else None

    def start(body, chat: bool, adapter: str | None = None):
        """Check the request and make its answer ready to prefill (a thread: tokenizing, images, the schema)."""
        job = parse(model, body, chat)
        job.model = f"{name}:{adapter}" if adapter else name
        answer = model.start(job.prompt, max_new_tokens=job.max_tokens, started=job.arrived, adapter=adapter,
                             **job.sampling)
        return job, answer

    def full() -> bool:
        return bool(batchers) and batchers[0].queued >= max_queue

    def busy():
        metrics.finished("busy")
        return error(f"the server is busy: {batchers[0].queued} requests are waiting for the model; retry shortly",
                     503, kind="server_busy", headers={"Retry-After": "2"})

    async def complete(request: Request, chat: bool):
        if full():  # before reading the body
            return busy()
        try:
            body = await read_json(request, max_request_bytes)
            asked = body.get("model") if isinstance(body, dict) else None
            if asked not in (None, "", *served()):
                raise BadRequest(not_served(asked, name), "model", status=404)
            job, answer = await run_in_threadpool(start, body, chat, adapter_of(asked))
        except BadRequest as e:
            metrics.finished("refused")
            return error(str(e), e.status, param=e.param,
                         kind="not_found_error" if e.status == 404 else "invalid_request_error")
        except EdgeLLMError as e:
            metrics.finished("refused")
            return error(str(e), param="messages" if chat else "prompt")
        loop = asyncio.get_running_loop()
        arrivals: asyncio.Queue = asyncio.Queue()

        def deliver(kind: str, value) -> None:  # on the Batcher's thread
            loop.call_soon_threadsafe(arrivals.put_nowait, (kind, value))

        try:
            handle = batcher().submit(answer, deliver, job.arrived, tag=job)
        except QueueFull:  # it filled while this request was read and checked
            return busy()
        if not job.stream:
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
                        return error(value, param="messages" if chat else "prompt")
                    if loop.time() >= check_at:
                        if await request.is_disconnected():  # nobody will read the answer: it stops
                            batcher().cancel(handle)
                            return Response(status_code=499)
                        check_at = loop.time() + DISCONNECT_CHECK_S
            except BaseException:
                batcher().cancel(handle)
                raise
            text = (result.text or None) if result.tool_calls else result.text  # calls alone: content null
            return JSONResponse(envelope(job, False, choices=[choice(job, text, result.finish_reason,
                                                                     calls=result.tool_calls)],
                                         usage=usage(result), timings=timings(result)))

        async def events():
            try:
                if job.chat:
                    yield event(job, choices=[choice(job, None, None, first=True)])
                while True:
                    kind, value = await arrivals.get()
                    if kind == "piece":
                        yield event(job, choices=[choice(job, value, None)])
                    elif kind == "error":  # after the 200 has gone out, an error can only be an event
                        yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                        return
                    else:
                        result = value
                        break
            except BaseException:  # the client went away (the stream was cancelled or closed)
                batcher().cancel(handle)
                raise
            if result.tool_calls:  # each call whole, in one chunk (OpenAI streams the same fields in pieces)
                calls = [{"index": i, **call} for i, call in enumerate(result.tool_calls)]
                yield event(job, choices=[{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": None,
                                           "logprobs": None}])
            yield event(job, choices=[choice(job, None, result.finish_reason)], timings=timings(result))
            if job.include_usage:
                yield event(job, choices=[], usage=usage(result))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def completions(request: Request):
        return await complete(request, chat=False)

    def model_card(served_id: str = name) -> dict:
        return {"id": served_id, "object": "model", "created": int(model.bundle.path.stat().st_mtime),
                "owned_by": "edgellm", "context_length": model.seq_length, "vision": model.vision is not None,
                "chat_template": model.chat_template is not None}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card(one) for one in served()]})

    async def one_model(request: Request):
        asked = request.path_params["model"]
        if asked not in served():
            return error(not_served(asked, name), 404, "model", kind="not_found_error")
        return JSONResponse(model_card(asked))

    async def prometheus(request: Request):
        b = batchers[0] if batchers else None
        gauges = {"queue_length": (b.queued if b else 0, "Requests waiting for a free slot."),
                  "running": (b.busy if b else 0, "Requests holding a slot (prefilling or decoding)."),
                  "slots": (model.engine.slots.__len__(), "Answers that can decode together (--parallel).")}
        if b and b.steps:
            gauges["batch_mean"] = (b.batched_tokens / b.steps, "Mean answers per decode step so far.")
        if prompt_cache is not None:
            gauges["prompt_cache_bytes"] = (prompt_cache.nbytes, "Memory the prompt cache holds.")
            gauges["prompt_cache_entries"] = (len(prompt_cache), "Sequences in the prompt cache.")
            gauges["prompt_cache_hits"] = (prompt_cache.hits, "Prompts that started from the prompt cache.")
        return PlainTextResponse(metrics.text(gauges), media_type="text/plain; version=0.0.4")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": name})

    async def page(request: Request):
        return HTMLResponse(html)

    async def http_error(request: Request, exc: HTTPException):
        return error(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code,
                     kind="not_found_error" if exc.status_code == 404 else "invalid_request_error")

    async def server_error(request: Request, exc: Exception):
        # a JSON body, as every other error has (the chat page and clients parse it); uvicorn logs the traceback
        return error(f"internal error: {type(exc).__name__}: {exc}", 500, kind="server_error")

    routes = [Route("/", page), Route("/health", health), Route("/metrics", prometheus), Route("/v1/models", models),
              Route("/v1/models/{model:path}", one_model),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if batchers:  # streams still running were given their grace time by the server
            try:
                batchers[0].close()
            except EdgeLLMError as e:  # the prompt cache could not be saved
                log.warning(str(e))

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan)
    return app if api_key is None else KeyCheck(app, api_key)


class KeyCheck:
    """ASGI wrapper: every HTTP request but GET /health carries the API key, or gets OpenAI's 401."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or self._allowed(scope):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

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


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or one clear error (a taken port, an unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog until the server accepts them (the model loads first)
    except OSError as e:
        reason = e.strerror or str(e)
        raise EdgeLLMError(f"cannot listen on {host}:{port}: {reason}"
                           + ("; choose another --port" if e.errno == errno.EADDRINUSE else "")) from None
    return sock


def serve(model, name: str, sock: socket.socket, max_request_bytes: int = MAX_REQUEST_BYTES,
          api_key: str | None = None, max_queue: int = MAX_QUEUE, prompt_cache=None) -> None:
    import uvicorn

    if not log.handlers:  # the request lines, beside uvicorn's access log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s edgellm: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    config = uvicorn.Config(create_app(model, name, max_request_bytes, api_key, max_queue, prompt_cache),
                            log_level="info",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    uvicorn.Server(config).run(sockets=[sock])
