"""The ollama API's side of the server (what Open WebUI and the ollama libraries speak): /api/chat and /api/generate
requests translated into the OpenAI shape that protocol.parse checks, and their answers written as ollama writes
them, streamed as NDJSON (one JSON object per line), with durations in nanoseconds. /api/tags, /api/show, /api/ps and
/api/version describe the served models."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from .protocol import BadRequest

VERSION = "0.6.0"  # the ollama API version whose routes and fields these are

# ollama's options -> the OpenAI request's fields (protocol.parse checks their values)
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
           "num_predict": "max_tokens", "stop": "stop", "repeat_penalty": "repetition_penalty"}
# options that change nothing here (the bundle fixes its context and threads) and are accepted as clients send them
IGNORED_OPTIONS = {"num_ctx", "num_thread", "num_gpu", "num_batch", "keep_alive", "use_mmap", "use_mlock", "numa",
                   "num_keep", "main_gpu", "low_vram", "vocab_only", "repeat_last_n"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _common(body: dict) -> dict:
    """The model, streaming (ollama streams unless told not to), options and format, as OpenAI fields."""
    out: dict = {"model": body.get("model") or None, "stream": body.get("stream", True)}
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'options' must be an object", "options")
    for name, value in options.items():
        if name in OPTIONS:
            out[OPTIONS[name]] = value
        elif name not in IGNORED_OPTIONS:
            raise BadRequest(f"option {name!r} is not supported (supported: {', '.join(OPTIONS)})", "options")
    if out.get("max_tokens") == -1:  # ollama's "no limit": as much as the context holds
        del out["max_tokens"]
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise BadRequest("'format' must be \"json\" or a JSON schema object", "format")
    return out


def _images(images, where: str) -> list[dict]:
    if images is None:
        return []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest(f"{where}: 'images' must be a list of base64 strings", "images")
    return [{"type": "image_url", "image_url": {"url": f"data:image/*;base64,{i}"}} for i in images]


def chat_request(body) -> dict:
    """An /api/chat body as an OpenAI chat request."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    out = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list of {'role': ..., 'content': ...}", "messages")
    out["messages"] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", "messages")
        message = {k: v for k, v in m.items() if k in ("role", "content", "tool_call_id")}
        if m.get("tool_name"):
            message["name"] = m["tool_name"]
        if m.get("tool_calls"):
            message["tool_calls"] = [{"type": "function", "function": {
                "name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get("arguments")}}
                for c in m["tool_calls"] if isinstance(c, dict)]
        parts = _images(m.get("images"), f"messages[{i}]")
        if parts:
            message["content"] = parts + [{"type": "text", "text": m.get("content") or ""}]
        out["messages"].append(message)
    if body.get("tools"):
        out["tools"] = body["tools"]
    return out


def generate_request(body, has_template: bool) -> tuple[dict, bool]:
    """An /api/generate body as an OpenAI request: (request, chat). A prompt goes through the chat template (with
    `system` and `images`) unless `raw` is set or the model has none."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    out = _common(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string", "prompt")
    if body.get("raw") or not has_template:
        if body.get("images"):
            raise BadRequest("images need the chat template; drop 'raw'", "images")
        out["prompt"] = prompt
        return out, False
    parts = _images(body.get("images"), "the request")
    user = {"role": "user", "content": parts + [{"type": "text", "text": prompt}] if parts else prompt}
    system = body.get("system")
    out["messages"] = ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + [user]
    return out, True


def _durations(result, total_s: float) -> dict:
    ns = 1_000_000_000
    return {"total_duration": int(total_s * ns), "load_duration": 0, "prompt_eval_count": result.prompt_tokens,
            "prompt_eval_duration": int(result.ttft_s * ns), "eval_count": len(result.token_ids),
            "eval_duration": int(result.decode_s * ns)}


def _calls(result) -> list[dict]:
    return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in result.tool_calls]


def piece(model: str, chat: bool, text: str) -> dict:
    """One streamed piece of an answer."""
    body = {"model": model, "created_at": now(), "done": False}
    if chat:
        body["message"] = {"role": "assistant", "content": text}
    else:
        body["response"] = text
    return body


def last(model: str, chat: bool, result, total_s: float, text: str = "") -> dict:
    """The answer's last object (done: true): the rest of its text (all of it, unstreamed), its calls and timings."""
    body = piece(model, chat, text)
    if chat and result.tool_calls:
        body["message"]["tool_calls"] = _calls(result)
    reason = {"length": "length"}.get(result.finish_reason, "stop")
    return {**body, "done": True, "done_reason": reason, **_durations(result, total_s)}


def elapsed(started: float) -> float:
    return time.perf_counter() - started


def tag(name: str, card: dict, size: int) -> dict:
    """A model in /api/tags' list."""
    return {"name": name, "model": name, "modified_at": datetime.fromtimestamp(card.get("created", 0), timezone.utc)
            .isoformat().replace("+00:00", "Z"), "size": size, "digest": "", "details": details(card)}


def details(card: dict) -> dict:
    family = card.get("family", "")
    return {"parent_model": "", "format": "onnx", "family": family, "families": [family], "parameter_size": "",
            "quantization_level": card.get("quantization", "")}


def show(card: dict, template: str) -> dict:
    capabilities = ["completion"] + (["vision"] if card.get("vision") else []) + (["tools"] if card.get("tools")
                                                                                   else [])
    return {"modelfile": "", "parameters": "", "template": template, "license": "", "details": details(card),
            "model_info": {"general.architecture": card.get("family", ""),
                           "edgellm.context_length": card.get("context_length")},
            "capabilities": capabilities, "modified_at": tag("", card, 0)["modified_at"]}
