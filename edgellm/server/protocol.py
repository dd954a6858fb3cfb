"""The OpenAI API's side of the server: requests checked and parsed into Jobs (before anything runs, a bad one is a
BadRequest naming its field), and the bodies and server-sent events of the answers."""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass, field

from ..errors import EdgeLLMError
from ..runtime.model import MAX_TOP_LOGPROBS, Prompt
from ..runtime.sampling import BOUNDS, Bound

# OpenAI fields that would change the answer but that edgellm does not implement: refused rather than ignored.
UNSUPPORTED = {"functions": "the deprecated function calls (use 'tools')", "suffix": "suffix", "echo": "echo",
               "best_of": "best_of", "logit_bias": "logit_bias"}


# Characters that end a line for Python's str.splitlines, which clients such as httpx use to read server-sent
# events: inside an event's JSON they are escaped, so that no client cuts an event in two (JSON allows \uXXXX there)
LINE_BREAKING = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})
MAX_CHOICES = 8  # n: answers to one prompt, decoded together in the batch
MAX_REQUEST_BYTES = 32 << 20  # a request body larger than this gets a 413 (images come base64-encoded inside)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class Job:
    """A checked request: what to prefill and how to sample."""

    prompt: Prompt
    max_tokens: int
    sampling: dict
    stream: bool
    include_usage: bool
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.perf_counter)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    model: str = ""  # the model id the answer names (the bundle's, or NAME:ADAPTER)
    logprobs: int | None = None  # the likeliest tokens to report beside each chosen one; None: no logprobs
    n: int = 1  # answers to the prompt, decoded together
    schema: object = None  # response_format's schema as asked (each further choice compiles its own constraint)


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
        # plain text: chat templates that expect strings stay happy
        content = "".join(p["text"] for p in parts) if all(p["type"] == "text" for p in parts) else parts
        out.append({"role": role, "content": content, **extra})
    return out, images


def _tool_fields(message: dict, where: str) -> dict:
    """An assistant turn's tool_calls (their JSON arguments as objects, as chat templates read them) and a tool
    result's tool_call_id / name."""
    extra: dict = {}
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


def _response_format(model, value) -> tuple[object, object]:
    """OpenAI's response_format -> (the schema as generate()'s json_schema takes it: True for any JSON object, or
    the schema; the compiled constraint of it), both None for text. Compiled here so that a schema the grammar
    engine refuses is a 400 on this field."""
    if value is None or value == {"type": "text"}:
        return None, None
    kind = value.get("type") if isinstance(value, dict) else None
    schema: object
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
    from ..runtime.constraints import JsonConstraint, schema_of

    try:
        return schema, JsonConstraint(model.grammar_tokenizer, schema_of(schema), model.manifest.model.vocab_size)
    except EdgeLLMError as e:
        raise BadRequest(str(e), "response_format") from None


def parse(model, body, chat: bool) -> Job:
    """Check an OpenAI request body against the model; raises BadRequest (or EdgeLLMError from the prompt)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}):
            raise BadRequest(f"'{name}' is not supported: edgellm does not implement {what}", name)
    n = _number(body, "n", Bound(1, MAX_CHOICES, integer=True)) or 1
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise BadRequest(f"'{name}' is not supported; use 'repetition_penalty' (1.0 = off)", name)
    schema, json_schema = _response_format(model, body.get("response_format"))
    logprobs = _logprobs(body, chat)
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
    sampling["logprobs"] = logprobs
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return Job(prompt, max_tokens, sampling, _flag(body, "stream"), _flag(stream_options, "include_usage"), chat,
               logprobs=logprobs, n=n, schema=schema)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many likeliest tokens to report beside each chosen one: chat's logprobs (true) + top_logprobs (0-20),
    a completion's logprobs (0-20); None when none are asked for."""
    if not chat:
        return _number(body, "logprobs", Bound(0, MAX_TOP_LOGPROBS, integer=True))
    top = _number(body, "top_logprobs", Bound(0, MAX_TOP_LOGPROBS, integer=True))
    if not _flag(body, "logprobs"):
        if top is not None:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return top or 0


def logprobs_of(job: Job, entries: list, text_of, offset: int = 0) -> dict:
    """OpenAI's logprobs object of generated tokens `entries` (GenerationResult.logprobs'), in the chat shape or
    the completions one (whose text offsets count from `offset`); `text_of(id)` is a token's text."""
    if job.chat:
        def item(token: int, logprob: float) -> dict:
            text = text_of(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(token, lp), "top_logprobs": [item(i, v) for i, v in top]}
                            for token, lp, top in entries], "refusal": None}
    texts = [text_of(token) for token, _, _ in entries]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{text_of(i): v for i, v in top} for _, _, top in entries], "text_offset": offsets}


def usage(results: list) -> dict:
    """Token counts of a request's answers (one prompt, n completions)."""
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": results[0].prompt_tokens, "completion_tokens": completion,
            "total_tokens": results[0].prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": results[0].reused_tokens}}


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
    # invalid UTF-8 is kept as lone surrogates through the parse, so that the error can name the field holding it
    text = bytes(body).decode("utf-8", errors="surrogateescape")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    where = _not_text(value, "")
    if where is not None:
        field = where.lstrip(".") or "the request body"
        raise BadRequest(f"{field} is not valid Unicode text (bytes that are not UTF-8, or a lone surrogate escape); "
                         "send the request body as UTF-8",
                         field.split(".")[0].split("[")[0] if where else None)
    return value


def _not_text(value, where: str) -> str | None:
    """The path of the first string (key or value) in `value` holding a lone surrogate: invalid UTF-8 bytes, or a
    JSON escape of half a character; None when all of them are text."""
    if isinstance(value, str):
        return where if any("\ud800" <= c <= "\udfff" for c in value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if _not_text(key, where) is not None:
                return f"{where}.{key.encode('utf-8', 'replace').decode()}"
            found = _not_text(item, f"{where}.{key}")
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _not_text(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def not_served(asked, served: list[str]) -> str:
    return f"model {asked!r} is not served here; this server serves {', '.join(repr(s) for s in served)}"


def log_line(job: Job, result, outcome: str) -> str:
    """What the log says of a request: its id, tokens (prompt, of them cached, completion), TTFT (of it, the wait
    for a free slot) and speed."""
    if result is None:
        return f"{job.id} {outcome} before its generation began"
    return (f"{job.id} {'chat' if job.chat else 'completion'}{' stream' if job.stream else ''} {outcome}: prompt "
            f"{result.prompt_tokens} tok ({result.reused_tokens} cached), {len(result.token_ids)} generated, TTFT "
            f"{result.ttft_s * 1000:.0f} ms ({result.queued_s * 1000:.0f} queued), decode "
            f"{result.decode_tokens_per_s:.1f} tok/s")



def envelope(job: Job, piece: bool, **fields) -> dict:
    """The body around an answer or a piece of one: its id, object kind, creation time and model."""
    kind = ("chat.completion" + (".chunk" if piece else "")) if job.chat else "text_completion"
    return {"id": ("chatcmpl-" if job.chat else "cmpl-") + job.id, "object": kind, "created": job.created,
            "model": job.model, **fields}


def choice(job: Job, text: str | None, finish: str | None, first: bool = False, calls=None, logprobs=None,
           index: int = 0) -> dict:
    """An answer's choice: a message (chat), a delta (a chat stream) or text (a completion)."""
    if not job.chat:
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    if not job.stream:
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs}
    delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def event(job: Job, **fields) -> str:
    """One server-sent event of a streamed answer."""
    return f"data: {event_json(envelope(job, True, **fields))}\n\n"


def error_event(message: str) -> str:
    """An error after the 200 has gone out: it can only be an event."""
    return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
