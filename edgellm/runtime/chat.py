"""Rendering conversations with the bundle's Jinja chat template, the way transformers does."""

from __future__ import annotations

import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import EdgeLLMError


def _raise(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None, eos_token: str | None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise EdgeLLMError(f"the bundle's chat template does not parse: {e}") from None
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        check_messages(messages)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special, **extra)
        except TemplateError as e:
            raise EdgeLLMError(f"the chat template refused the conversation: {e}") from None
        except Exception as e:  # a template's own bug (adding a string to a number...): still one clear line
            raise EdgeLLMError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from None


def user_content(text: str, images: int = 0, videos: int = 0):
    """A user message's content: the text alone, or `images` image parts and `videos` video parts (in that order,
    the convention for media given apart from the messages) followed by the text."""
    if not images and not videos:
        return text
    return [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]


def message_texts(message: dict) -> list[str]:
    """A checked message's text: its content string, or its text parts' texts."""
    content = message["content"]
    if content is None:  # an assistant turn of tool calls only
        return []
    return [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise EdgeLLMError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise EdgeLLMError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if isinstance(m["content"], list):
            for part in m["content"]:
                if not isinstance(part, dict) or part.get("type") not in ("text", "image", "video"):
                    raise EdgeLLMError(f"message {i}: a content part must be a dict with 'type' text, image or "
                                       f"video, got {part!r}")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise EdgeLLMError(f"message {i}: a text part needs a 'text' string, got {part!r}")
        elif not isinstance(m["content"], str) and not (m["content"] is None and m.get("tool_calls")):
            raise EdgeLLMError(f"message {i}: content must be a string or a list of parts, got {m['content']!r}")
