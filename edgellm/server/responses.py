"""The OpenAI Responses API's text subset (POST /v1/responses): a request's instructions and input items become a
chat request that protocol.parse checks, and the answer comes back as a Response object, or streamed as its typed
events (response.created ... response.output_text.delta ... response.completed). Function tools and their calls
work as in chat completions. Stored responses (previous_response_id, background) are not kept: refused."""

from __future__ import annotations

import json
import time
import uuid

from .protocol import BadRequest, event_json

NOT_KEPT = ("previous_response_id", "background", "conversation", "prompt")


def chat_request(body) -> dict:
    """A Responses request as an OpenAI chat request."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name in NOT_KEPT:
        if body.get(name) not in (None, False):
            raise BadRequest(f"'{name}' is not supported: this server keeps no responses; send the whole "
                             "conversation as 'input'", name)
    messages = []
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty list of input items", "input")
    for i, item in enumerate(items):
        messages.append(_message(item, f"input[{i}]"))
    out: dict = {"model": body.get("model"), "messages": messages, "stream": body.get("stream", False)}
    for name in ("temperature", "top_p", "seed", "stop"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("max_output_tokens") is not None:
        out["max_completion_tokens"] = body["max_output_tokens"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.get("name", "format"),
                                                                         "schema": fmt.get("schema")}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    if body.get("tools"):
        out["tools"] = [_tool(t, i) for i, t in enumerate(body["tools"])]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        out["tool_choice"] = choice
    return out


def _message(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be an object", "input")
    kind = item.get("type", "message")
    if kind == "function_call":
        return {"role": "assistant", "content": None, "tool_calls": [{"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}]}
    if kind == "function_call_output":
        output = item.get("output")
        return {"role": "tool", "tool_call_id": item.get("call_id"),
                "content": output if isinstance(output, str) else json.dumps(output)}
    if kind != "message":
        raise BadRequest(f"{where}: input items of type {kind!r} are not supported (message, function_call, "
                         "function_call_output)", "input")
    content = item.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            part_kind = part.get("type") if isinstance(part, dict) else None
            if part_kind in ("input_text", "output_text", "text"):
                parts.append({"type": "text", "text": part.get("text")})
            elif part_kind == "input_image":
                parts.append({"type": "image_url", "image_url": {"url": part.get("image_url")}})
            else:
                raise BadRequest(f"{where}.content[{j}]: parts must be input_text, output_text or input_image",
                                 "input")
        content = parts
    return {"role": item.get("role"), "content": content}


def _tool(tool, i: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise BadRequest(f"tools[{i}]: only function tools are supported", "tools")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                             if k in tool}}


class ResponseWriter:
    """The Response object of one answer and, streamed, its events in order."""

    def __init__(self, model: str, body: dict):
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.model, self.created, self.sequence = model, int(time.time()), 0
        self.request = body
        self.text = ""

    def response(self, status: str, result=None) -> dict:
        body = self.request
        output = []
        if result is not None:
            output.append(self.message_item("completed", result.text))  # (empty beside calls: streams open it first)
            for call in result.tool_calls:
                output.append({"type": "function_call", "id": f"fc_{call['id']}", "call_id": call["id"],
                               "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                               "status": "completed"})
        incomplete = result is not None and result.finish_reason == "length"
        usage = None if result is None else {
            "input_tokens": result.prompt_tokens, "output_tokens": len(result.token_ids),
            "total_tokens": result.prompt_tokens + len(result.token_ids),
            "input_tokens_details": {"cached_tokens": result.reused_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}}
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": "incomplete" if incomplete and status == "completed" else status,
                "model": self.model, "output": output, "usage": usage, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "temperature": body.get("temperature"), "top_p": body.get("top_p"), "tools": body.get("tools") or [],
                "tool_choice": body.get("tool_choice") or "auto", "parallel_tool_calls": True,
                "text": body.get("text") or {"format": {"type": "text"}}, "metadata": body.get("metadata") or {}}

    def message_item(self, status: str, text: str | None = None) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {event_json(data)}\n\n"

    def opening(self) -> list[str]:
        return [self.event("response.created", response=self.response("in_progress")),
                self.event("response.in_progress", response=self.response("in_progress")),
                self.event("response.output_item.added", output_index=0, item=self.message_item("in_progress", None)),
                self.event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": []})]

    def delta(self, piece: str) -> str:
        self.text += piece
        return self.event("response.output_text.delta", item_id=self.message_id, output_index=0, content_index=0,
                          delta=piece, logprobs=[])

    def closing(self, result) -> list[str]:
        part = {"type": "output_text", "text": result.text, "annotations": []}
        events = [self.event("response.output_text.done", item_id=self.message_id, output_index=0, content_index=0,
                             text=result.text, logprobs=[]),
                  self.event("response.content_part.done", item_id=self.message_id, output_index=0, content_index=0,
                             part=part),
                  self.event("response.output_item.done", output_index=0, item=self.message_item("completed",
                                                                                                 result.text))]
        final = self.response("completed", result)
        for index, item in enumerate(final["output"]):
            if item["type"] == "function_call":
                events += [self.event("response.output_item.added", output_index=index, item=item),
                           self.event("response.output_item.done", output_index=index, item=item)]
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return events + [self.event(kind, response=final)]

    def failed(self, message: str) -> str:
        failed = {**self.response("failed"), "error": {"code": "server_error", "message": message}}
        return self.event("response.failed", response=failed)
