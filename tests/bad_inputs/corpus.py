"""The bad-input corpus (see README.md): Case(name, surface, make, expected code, message part).

make(env) builds the input and returns what the surface takes: argv after `edgellm` for the command line (with
stdin bytes or chat lines where needed), or (method, path, request options) for HTTP. `env` holds a tiny model's
folder, its bundle and GGUF, and a scratch folder (`env.tmp`, a new one per case).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Case:
    name: str
    surface: str  # "cli" or "http"
    make: Callable
    code: int  # exit code or HTTP status
    message: str  # a part of the one error message (empty: success expected)
    stdin: bytes | None = None
    lines: list = field(default_factory=list)  # chat: lines typed


def copy_bundle(env, damage: Callable[[Path], None]) -> Path:
    out = env.tmp / "bundle"
    shutil.copytree(env.bundle, out)
    damage(out)
    return out


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        data = json.loads((bundle / "manifest.json").read_text())
        change(data)
        (bundle / "manifest.json").write_text(json.dumps(data))
    return damage


def replace_file(name: str, text: str) -> Callable[[Path], None]:
    """Replace a bundle file and record it in the manifest (as a user editing the bundle would have to)."""
    def damage(bundle: Path) -> None:
        from edgellm.format import file_checksums

        (bundle / name).write_text(text)
        data = json.loads((bundle / "manifest.json").read_text())
        data["files"][name] = {"bytes": (bundle / name).stat().st_size, **file_checksums(bundle / name)}
        (bundle / "manifest.json").write_text(json.dumps(data))
    return damage


def copy_folder(env, change: Callable[[Path], None]) -> Path:
    out = env.tmp / "hf"
    shutil.copytree(env.folder, out)
    change(out)
    return out


def edit_config(**values) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(values)
        (folder / "config.json").write_text(json.dumps(config))
    return change


def lying_safetensors(folder: Path) -> None:
    """A header that says a tensor runs past the end of the file."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + (1 << 30)]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])


def converted(env, name: str, **options) -> Path:
    """The tiny model converted with `options` (encrypt, num_devices...) into the case's scratch folder."""
    import edgellm

    return edgellm.convert(env.folder, env.tmp / name, quantize="f32", seq_length=64, progress=False, **options)


def written(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def shared_then_changed(env) -> Path:
    """A bundle sharing its weights file with another, whose file was then rewritten in place."""
    first = converted(env, "s64")
    second = converted(env, "s32", share_weights_with=first, chunk_length=32)
    flip_byte(first / "decoder.onnx.data", 1000)
    return second


def convert(env, source, *options) -> list[str]:
    return ["convert", "-m", str(source), "-o", str(env.tmp / "out"), "-s", "64", *options]


def run(bundle, *args) -> list[str]:
    return ["run", str(bundle), *args] if args else ["run", str(bundle), "Liberty", "-n", "2"]


def post(path: str, body=None, **options):
    if body is not None:
        options["json"] = body
    return ("POST", path, options)


CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "We hold these truths"}]

CASES = [
    # --- convert ----------------------------------------------------------------------------------------------------
    Case("convert: no such source", "cli", lambda e: convert(e, e.tmp / "missing"), 2, "no such file or folder"),
    Case("convert: a file that is not GGUF", "cli",
         lambda e: convert(e, (e.tmp / "model.bin").write_bytes(b"x") and e.tmp / "model.bin"), 2,
         "expected a Hugging Face model folder or a .gguf file"),
    Case("convert: a folder without config.json", "cli",
         lambda e: convert(e, copy_folder(e, lambda f: (f / "config.json").unlink())), 2, "no config.json"),
    Case("convert: config.json that is not JSON", "cli",
         lambda e: convert(e, copy_folder(e, lambda f: (f / "config.json").write_text("{oops"))), 2, "config.json"),
    Case("convert: unknown architecture", "cli",
         lambda e: convert(e, copy_folder(e, edit_config(architectures=["PhiForCausalLM"]))), 2,
         "PhiForCausalLM"),
    Case("convert: no weights", "cli",
         lambda e: convert(e, copy_folder(e, lambda f: (f / "model.safetensors").unlink())), 2,
         "no *.safetensors weights found"),
    Case("convert: safetensors header that lies about sizes", "cli",
         lambda e: convert(e, copy_folder(e, lying_safetensors)), 2, "model.safetensors"),
    Case("convert: truncated safetensors", "cli",
         lambda e: convert(e, copy_folder(e, lambda f: truncate(f / "model.safetensors", 0.5))), 2,
         "model.safetensors"),
    Case("convert: no tokenizer.json", "cli",
         lambda e: convert(e, copy_folder(e, lambda f: (f / "tokenizer.json").unlink())), 2, "no tokenizer.json"),
    Case("convert: a fake GGUF", "cli",
         lambda e: convert(e, (e.tmp / "fake.gguf").write_bytes(b"GGUF" + b"\0" * 64) and e.tmp / "fake.gguf"), 2,
         "not a readable GGUF file"),
    Case("convert: a truncated GGUF", "cli",
         lambda e: convert(e, shutil.copy(e.gguf, e.tmp / "t.gguf") and truncate(e.tmp / "t.gguf", 0.6)
                           or e.tmp / "t.gguf"), 2, "t.gguf"),
    Case("convert: -q w8 on a GGUF", "cli", lambda e: convert(e, e.gguf, "-q", "w8"), 2,
         "-q w8 does not apply to this GGUF's Q4_0 blocks"),
    Case("convert: --asym on a GGUF", "cli", lambda e: convert(e, e.gguf, "--asym"), 2,
         "--asym does not apply to a GGUF"),
    Case("convert: --reblock on a folder", "cli", lambda e: convert(e, e.folder, "--reblock"), 2,
         "--reblock applies to GGUF files"),
    Case("convert: a sequence longer than the model's", "cli", lambda e: convert(e, e.folder, "-s", "100000"), 2,
         "more than the 1024 positions"),
    Case("convert: an output that exists", "cli",
         lambda e: ["convert", "-m", str(e.folder), "-o", str(e.bundle)], 2, "already exists"),
    Case("convert: an unknown KV cache precision", "cli", lambda e: convert(e, e.folder, "--kv-cache", "int4"), 2,
         "invalid choice: 'int4'"),
    Case("convert: --max-pixels on a text model", "cli", lambda e: convert(e, e.folder, "--max-pixels", "640,480"),
         2, "--max-pixels 640,480 applies to vision-language models only"),
    # --- load -------------------------------------------------------------------------------------------------------
    Case("load: no such bundle", "cli", lambda e: run(e.tmp / "nothing"), 2, "no such bundle folder"),
    Case("load: a folder that is not a bundle or a model", "cli", lambda e: run(e.tmp), 2,
         "not an edgellm bundle (no manifest.json), a Hugging Face model folder"),
    Case("load: a broken .gguf file", "cli",
         lambda e: run((e.tmp / "fake.gguf").write_bytes(b"GGUF" + b"\0" * 64) and e.tmp / "fake.gguf"), 2,
         "not a readable GGUF file"),
    Case("load: manifest that is not JSON", "cli",
         lambda e: run(copy_bundle(e, lambda b: (b / "manifest.json").write_text("{"))), 2, "corrupt manifest"),
    Case("load: manifest of a newer format", "cli",
         lambda e: run(copy_bundle(e, edit_manifest(lambda m: m.update(format_version=99)))), 2, "upgrade edgellm"),
    Case("load: manifest missing a key", "cli",
         lambda e: run(copy_bundle(e, edit_manifest(lambda m: m.pop("model")))), 2, "corrupt manifest"),
    Case("load: manifest of another format", "cli",
         lambda e: run(copy_bundle(e, edit_manifest(lambda m: m.update(format="something")))), 2,
         "is not edgellm-bundle"),
    Case("load: truncated weights", "cli",
         lambda e: run(copy_bundle(e, lambda b: truncate(b / "decoder.onnx.data", 0.5))), 2, "truncated or replaced"),
    Case("load: a bit flipped in the weights", "cli",
         lambda e: run(copy_bundle(e, lambda b: flip_byte(b / "decoder.onnx.data", 1000))), 2, "decoder.onnx.data"),
    Case("load: a bit flipped in the graph", "cli",
         lambda e: run(copy_bundle(e, lambda b: flip_byte(b / "decoder.onnx", 100))), 2, "decoder.onnx"),
    Case("load: a bit flipped in the embedding table", "cli",
         lambda e: run(copy_bundle(e, lambda b: flip_byte(b / "embed_tokens.npy", 500))), 2, "embed_tokens.npy"),
    Case("load: a missing tokenizer", "cli",
         lambda e: run(copy_bundle(e, lambda b: (b / "tokenizer.json").unlink())), 2, "tokenizer.json is missing"),
    Case("load: an unknown device", "cli", lambda e: run(e.bundle, "Liberty", "-c", "tpu"), 2,
         "unknown device 'tpu'"),
    Case("load: a bundle split for 2 devices given 3", "cli",
         lambda e: run(converted(e, "split", num_devices=2), "Liberty", "-c", "cpu,cpu,cpu"), 2,
         "split for 2 devices; give 2"),
    Case("load: an encrypted bundle without its key", "cli",
         lambda e: run(converted(e, "sealed", encrypt=True, key="a long enough key")), 2,
         "the bundle is encrypted: give its key"),
    Case("load: an encrypted bundle with a wrong key file", "cli",
         lambda e: run(converted(e, "sealed", encrypt=True, key="a long enough key"), "Liberty", "--key-file",
                       str(written(e.tmp / "key", "another key entirely"))), 2, "wrong key for this encrypted bundle"),
    Case("load: a LoRA adapter folder without its weights", "cli",
         lambda e: run(e.bundle, "Liberty", "--adapter", str(written(e.tmp / "a" / "adapter_config.json", "{}"
                                                                          ).parent)), 2,
         "no adapter_model.safetensors"),
    Case("load: a shared weights file that changed", "cli",
         lambda e: run(shared_then_changed(e)), 2, "changed since this bundle was made"),
    # --- run --------------------------------------------------------------------------------------------------------
    Case("run: a prompt over the context", "cli", lambda e: run(e.bundle, "truths " * 200, "-n", "2"), 2,
         "holds at most 96"),
    Case("run: an empty prompt", "cli", lambda e: run(e.bundle, "   "), 2, "the prompt is empty"),
    Case("run: no prompt", "cli", lambda e: ["run", str(e.bundle)], 2, "give the prompt once"),
    Case("run: stdin that is not UTF-8", "cli", lambda e: run(e.bundle, "-"), 2, "standard input is not UTF-8",
         stdin=b"caf\xe9 au lait"),
    Case("run: a lone surrogate in the argument", "cli", lambda e: run(e.bundle, "x\udcff", "-n", "2"), 2,
         "not valid Unicode"),
    Case("run: control characters are text, answered", "cli",
         lambda e: run(e.bundle, "bell\x07 tab\t nul-free\x1b[31m", "-n", "2"), 0, ""),
    Case("run: an image on a text bundle", "cli",
         lambda e: run(e.bundle, "What is this?", "-i", str(e.tmp / "a.png")), 2, "no vision graph"),
    Case("run: a sampling setting out of range", "cli",
         lambda e: run(e.bundle, "Liberty", "--top-p", "1.5"), 2, "top_p must be above 0 and at most 1"),
    Case("run: a negative thread count", "cli", lambda e: run(e.bundle, "Liberty", "-t", "-2"), 2,
         "must be 1 or more"),
    Case("run: a draft bundle that does not exist", "cli",
         lambda e: run(e.bundle, "Liberty", "--draft", str(e.tmp / "none")), 2, "no such bundle folder"),
    Case("run: a chat template that raises", "cli",
         lambda e: run(copy_bundle(e, replace_file("chat_template.jinja", "{{ raise_exception('only user and "
                                                   "assistant roles are supported') }}")), "Liberty", "-n", "2"), 2,
         "only user and assistant roles are supported"),
    Case("run: a chat template with a bug", "cli",
         lambda e: run(copy_bundle(e, replace_file("chat_template.jinja", "{{ messages[0]['content'] + 1 }}")),
                       "Liberty", "-n", "2"), 2, "the chat template failed on this conversation (TypeError"),
    Case("load: a chat template that does not parse", "cli",
         lambda e: run(copy_bundle(e, replace_file("chat_template.jinja", "{% for m in messages %}"))), 2,
         "chat template does not parse"),
    # --- chat -------------------------------------------------------------------------------------------------------
    Case("chat: an unknown command", "cli", lambda e: ["chat", str(e.bundle)], 0, "unknown command /foo",
         lines=["/foo", "/quit"]),
    Case("chat: /image on a text bundle", "cli", lambda e: ["chat", str(e.bundle)], 0, "no vision graph",
         lines=["/image a.png", "/quit"]),
    Case("chat: a message over the context", "cli", lambda e: ["chat", str(e.bundle), "-n", "4"], 0,
         "does not fit the bundle's 96-token context", lines=["truths " * 200, "/quit"]),
    # --- serve ------------------------------------------------------------------------------------------------------
    Case("serve: malformed JSON", "http", lambda e: post(CHAT, content=b'{"messages": ['), 400, "not valid JSON"),
    Case("serve: deeply nested JSON", "http", lambda e: post(CHAT, content=b"[" * 200000 + b"]" * 200000), 400,
         "nested too deeply"),
    Case("serve: a body over the limit", "http", lambda e: post(CHAT, {"messages": USER, "pad": "x" * (33 << 20)}),
         413, "this server takes at most"),
    Case("serve: a form instead of JSON", "http",
         lambda e: post(CHAT, content=b"--x\r\n\r\nhello\r\n--x--", headers={"content-type": "multipart/form-data; "
                                                                                           "boundary=x"}),
         415, "send the request body as JSON"),
    Case("serve: no body", "http", lambda e: post(CHAT, content=b""), 400, "not valid JSON"),
    Case("serve: a JSON list", "http", lambda e: post(CHAT, [1, 2]), 400, "must be a JSON object"),
    Case("serve: messages that are not a list", "http", lambda e: post(CHAT, {"messages": "hi"}), 400,
         "'messages' must be a non-empty list"),
    Case("serve: an unknown role", "http", lambda e: post(CHAT, {"messages": [{"role": "robot", "content": "x"}]}),
         400, "role 'robot' is not supported"),
    Case("serve: content that is a number", "http", lambda e: post(CHAT, {"messages": [{"role": "user",
                                                                                       "content": 5}]}),
         400, "'content' must be a string or a list of parts"),
    Case("serve: a lone surrogate", "http",
         lambda e: post(CHAT, content=b'{"messages": [{"role": "user", "content": "\\udc80"}]}'), 400,
         "not valid Unicode"),
    Case("serve: bytes that are not UTF-8", "http", lambda e: post(CHAT, content=b'{"messages": "\xff"}'), 400,
         "messages is not valid Unicode text (bytes that are not UTF-8"),
    Case("serve: a message that is not UTF-8", "http",
         lambda e: post(CHAT, content=b'{"messages": [{"role": "user", "content": "caf\xc3"}]}'), 400,
         "messages[0].content is not valid Unicode text"),
    Case("serve: a prompt over the context", "http",
         lambda e: post(CHAT, {"messages": [{"role": "user", "content": "truths " * 200}]}), 400, "holds at most 96"),
    Case("serve: a 10 MB prompt", "http",
         lambda e: post("/v1/completions", {"prompt": "truths " * 1_500_000}), 400, "shorten the prompt"),
    Case("serve: max_tokens of 10^9 is capped to the room left", "http",
         lambda e: post("/v1/completions", {"prompt": "Liberty", "max_tokens": 10 ** 9, "temperature": 0}), 200, ""),
    Case("serve: max_tokens of 2^40", "http",
         lambda e: post(CHAT, {"messages": USER, "max_tokens": 1 << 40}), 400, "'max_tokens' must be"),
    Case("serve: a temperature that is a string", "http",
         lambda e: post(CHAT, {"messages": USER, "temperature": "hot"}), 400, "'temperature' must be a number"),
    Case("serve: an image URL on the network", "http",
         lambda e: post(CHAT, {"messages": [{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}), 400, "only data: URLs"),
    Case("serve: an image that is not base64", "http",
         lambda e: post(CHAT, {"messages": [{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}), 400, "not valid base64"),
    Case("serve: an unknown model", "http", lambda e: post(CHAT, {"model": "gpt-4o", "messages": USER}), 404,
         "'gpt-4o' is not served here"),
    Case("serve: a tool choice naming no tool", "http", lambda e: post(CHAT, {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}), 400, "names the function 'g', which is not among the 'tools'"),
    Case("serve: an unknown route", "http", lambda e: ("GET", "/v1/nothing", {}), 404, "Not Found"),
    Case("serve: GET on a POST route", "http", lambda e: ("GET", CHAT, {}), 405, "Method Not Allowed"),
    Case("serve: a bad request streamed", "http",
         lambda e: post(CHAT, {"messages": [], "stream": True}), 400, "'messages' must be a non-empty list"),
]
