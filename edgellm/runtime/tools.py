"""Tool calls (OpenAI `tools` / `tool_choice`) in the model's own chat-template format.

The chat template renders the tools into the prompt (its `tools` variable), and the model answers with calls in the
format it was trained on, which is read back into OpenAI `tool_calls`; the template tells which (the README names
the checkpoints of each):
- "tagged": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, possibly after some text;
- "json": the whole answer is `{"name": ..., "parameters": {...}}`.
`tool_choice` "required" or a named function holds the answer to a call of the tools' schemas with the grammar
engine (runtime.constraints); "auto" lets the model choose; "none" renders no tools.
- "generic", for a template that renders no tools (as llama.cpp's server does for such models): the tools and the
  answer's form are described in the system message, and every answer is held by the grammar to one JSON object,
  `{"tool_calls": [{"name": ..., "arguments": {...}}]}` (one call) or (tool_choice "auto") `{"response": "..."}`;
  earlier calls and tool results in the conversation are written in the same JSON, as messages any template renders.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..errors import EdgeLLMError

TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"
JSON_HINT = "respond with a JSON for a function call"
CALL_WHITESPACE = " ?"  # a call is one line of JSON, as the formats' examples write it


def tool_format(template_source: str | None) -> str:
    """The tool-call format a chat template writes; "generic" when it renders no tools."""
    if not template_source or "tools" not in template_source:
        return "generic"
    if TAG_OPEN in template_source:
        return "tagged"
    if JSON_HINT in template_source:
        return "json"
    return "generic"


GENERIC_SYSTEM = ("You can call these tools (JSON schemas of their arguments):\n{tools}\n\nAnswer with one JSON "
                  "object and nothing else: {{\"tool_calls\": [{{\"name\": \"<a tool's name>\", \"arguments\": "
                  "{{...}}}}]}} to call tools{or_answer}.")
GENERIC_ANSWER = ", or {\"response\": \"<your answer>\"} to answer the user directly"


@dataclass
class Tools:
    """The request's tools, as the template and the parser use them."""

    format: str
    functions: list[dict]  # OpenAI function objects: {"name", "description", "parameters"}
    choice: str | None  # "auto", "required", or the one function's name that must be called

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.functions]

    def template_tools(self) -> list[dict]:
        """What the chat template's `tools` variable gets (OpenAI's form, as transformers passes it)."""
        return [{"type": "function", "function": f} for f in self.functions]

    def template_variables(self) -> dict:
        """The chat template's extra variables: the tools, for a template that renders them."""
        return {} if self.format == "generic" else {"tools": self.template_tools()}

    def messages(self, messages: list[dict]) -> list[dict]:
        """The conversation as the template gets it. Generic: the tools described in the system message, earlier
        calls and tool results written as the JSON the answers use, in roles every template renders."""
        if self.format != "generic":
            return messages
        listed = "\n".join(json.dumps({"name": f["name"], "description": f.get("description", ""),
                                        "parameters": f.get("parameters") or {"type": "object"}}, ensure_ascii=False)
                           for f in self.functions if self.choice in ("auto", "required", f["name"]))
        system = GENERIC_SYSTEM.format(tools=listed, or_answer=GENERIC_ANSWER if self.choice == "auto" else "")
        out: list[dict] = []
        for m in messages:
            if m["role"] == "system" and not out and isinstance(m.get("content"), str):
                system = f"{m['content']}\n\n{system}"
            elif m["role"] == "tool":
                result = {"name": m.get("name"), "tool_call_id": m.get("tool_call_id"), "content": m.get("content")}
                out.append({"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)})
            elif m["role"] == "assistant" and m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in m["tool_calls"]]
                out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)})
            else:
                out.append(m)
        return [{"role": "system", "content": system}, *out]

    def grammar(self, token_to_id) -> str | None:
        """A Lark grammar (llguidance) holding the answer to one call, where the choice asks for one; else None.
        token_to_id(text) -> the id of a special token, or None."""
        if self.choice == "auto" and self.format != "generic":
            return None
        wanted = [f for f in self.functions if self.choice in ("auto", "required", f["name"])]
        key = "parameters" if self.format == "json" else "arguments"
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                     key: f.get("parameters") or {"type": "object"}},
                  "required": ["name", key], "additionalProperties": False} for f in wanted]
        if self.format == "generic":
            # one call per answer: small models asked for a list of calls tend to repeat them to the token limit
            answers = [{"type": "object", "properties": {"tool_calls": {"type": "array", "items": {"anyOf": calls},
                                                                        "minItems": 1, "maxItems": 1}},
                        "required": ["tool_calls"], "additionalProperties": False}]
            if self.choice == "auto":
                answers.append({"type": "object", "properties": {"response": {"type": "string"}},
                                "required": ["response"], "additionalProperties": False})
            schema = json.dumps({"anyOf": answers, "x-guidance": {"whitespace_pattern": CALL_WHITESPACE}})
            return f"start: answer\nanswer: %json {schema}\n"
        schema = json.dumps({"anyOf": calls, "x-guidance": {"whitespace_pattern": CALL_WHITESPACE}})
        if self.format == "json":
            return f"start: call\ncall: %json {schema}\n"

        def literal(text: str) -> str:
            token = token_to_id(text)
            return f"<[{token}]>" if token is not None else json.dumps(text)

        return f'start: {literal(TAG_OPEN)} "\\n" call "\\n" {literal(TAG_CLOSE)}\ncall: %json {schema}\n'

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(the answer's text outside its calls, or None; the calls as OpenAI tool_calls)."""
        found: list[tuple[str, dict]] = []
        content: str | None = text
        if self.format == "tagged":
            blocks = list(re.finditer(re.escape(TAG_OPEN) + r"(.*?)(?:" + re.escape(TAG_CLOSE) + r"|$)", text,
                                      re.S))
            for block in blocks:
                call = _json_object(block.group(1))
                if call is not None and isinstance(call.get("name"), str):
                    found.append((call["name"], call.get("arguments", {})))
            if found:
                content = text[:blocks[0].start()] + "".join(
                    text[a.end():b.start()] for a, b in zip(blocks, blocks[1:]))
        elif self.format == "generic":
            answer = _json_object(text) or {}
            listed = answer.get("tool_calls")
            found = [(c["name"], c.get("arguments", {})) for c in (listed if isinstance(listed, list) else [])
                     if isinstance(c, dict) and isinstance(c.get("name"), str)]
            content = answer["response"] if isinstance(answer.get("response"), str) else (None if found else text)
        else:
            call = _json_object(text.strip().removeprefix("<|python_tag|>"))
            if call is not None and isinstance(call.get("name"), str):
                found.append((call["name"], call.get("parameters", call.get("arguments", {}))))
                content = ""
        calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                  "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
                 for name, arguments in found if name in self.names]
        if calls:  # (only the end is trimmed: the start may have been streamed already)
            content = (content or "").rstrip() or None
        return content, calls

    def hold_back(self, text: str) -> int:
        """How much of a streamed answer's end must wait: from the start of a call (tagged: its opening tag, or what
        may become one; json: an answer that opens with a brace) to the end."""
        if self.format == "generic":  # the whole answer is JSON: shown once it is read
            return len(text)
        if self.format == "json":
            stripped = text.lstrip()
            return len(text) if not stripped or stripped[0] in "{<" else 0
        at = text.find(TAG_OPEN)
        if at >= 0:
            return len(text) - at
        for n in range(min(len(TAG_OPEN) - 1, len(text)), 0, -1):
            if TAG_OPEN.startswith(text[-n:]):
                return n
        return 0


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def tools_of(template_source: str | None, tools, tool_choice) -> Tools | None:
    """Check OpenAI `tools` and `tool_choice` against the chat template; None when no tools are to be offered.
    Raises EdgeLLMError (naming the field) for malformed ones or a template without a tool format."""
    if tools in (None, []):
        if tool_choice not in (None, "none", "auto"):
            raise EdgeLLMError("'tool_choice' asks for a tool call, but the request has no 'tools'")
        return None
    if not isinstance(tools, list):
        raise EdgeLLMError("'tools' must be a list of {'type': 'function', 'function': {'name': ..., ...}}")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise EdgeLLMError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                               "'parameters': {...}}}")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise EdgeLLMError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions.append({k: function[k] for k in ("name", "description", "parameters") if k in function})
    if tool_choice in (None, "auto"):
        choice = "auto"
    elif tool_choice == "none":
        return None
    elif tool_choice == "required":
        choice = "required"
    elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
          and isinstance(tool_choice.get("function"), dict)):
        choice = tool_choice["function"].get("name")
        if choice not in [f["name"] for f in functions]:
            raise EdgeLLMError(f"'tool_choice' names the function {choice!r}, which is not among the 'tools'")
    else:
        raise EdgeLLMError("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                           "{'name': ...}}")
    return Tools(tool_format(template_source), functions, choice)
