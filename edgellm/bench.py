"""`edgellm bench`: time to first token, prefill and decode speed per prompt length, and peak memory."""

from __future__ import annotations

import collections
import json
import os
import resource
import statistics
import time

import numpy as np

from .errors import EdgeLLMError


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(model, prompt_lengths: list[int], decode_tokens: int = 128, repeats: int = 3,
          quiet: bool = False) -> list[dict]:
    """Greedy runs on fixed pseudo-random prompts, cache cleared before each; medians of `repeats` runs."""
    rng = np.random.default_rng(0)
    vocab = model.engine.embeddings.shape[0]
    rows = []
    for n in prompt_lengths:
        if n + decode_tokens > model.seq_length:
            print(f"skipping {n}-token prompt: {n} + {decode_tokens} exceeds the bundle's {model.seq_length}")
            continue
        ids = rng.integers(100, vocab, n).tolist()
        runs = []
        for _ in range(repeats):
            model.engine.reset()
            runs.append(model.generate(ids, max_new_tokens=decode_tokens, ignore_eos=True))
        rows.append({
            "prompt_tokens": n,
            "ttft_ms": statistics.median(r.ttft_s for r in runs) * 1000,
            "prefill_tok_s": statistics.median(r.prefill_tokens_per_s for r in runs),
            "decode_tok_s": statistics.median(r.decode_tokens_per_s for r in runs),
            "decode_tokens": decode_tokens,
            "peak_rss_mib": peak_rss_mib(),
        })
    if not quiet:
        print(format_table(model, rows))
    return rows


def bench_sampling(model, draws: int = 200) -> str:
    """What drawing one token costs through the bundle's sampling head and through the Python sampler, on one row of
    the model's logits (temperature 0.8, top-k 40, top-p 0.95, repetition penalty 1.1 over 64 tokens of history)."""
    from .runtime.sampling import Sampler, SamplingParams

    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=0)
    logits = model.logits(list(range(10, 26)))[-1]
    history = list(range(100, 164))
    times = {}
    for name, sampler in (("python", Sampler(params)), ("head", model.sampler(params))):
        sampler(logits, history)  # the first call opens the head's session
        started = time.perf_counter()
        for _ in range(draws):
            sampler(logits, history)
        times[name] = (time.perf_counter() - started) / draws * 1000
    return (f"sampling one token over {logits.shape[0]} logits: head {times['head']:.3f} ms, "
            f"Python sampler {times['python']:.3f} ms")


def bench_vision(model, decode_tokens: int = 32, repeats: int = 3) -> str:
    """Rows for 1 image, 4 images and a video (when PyAV is installed), like the vendor demos' tables: one
    448x448 picture (InternVL: one tile) per image, encoded afresh each run (the embedding cache is cleared)."""
    import tempfile

    from PIL import Image

    size = 448
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(4)]
    cases: list[tuple[str, dict[str, list]]] = [("1 image", {"images": pictures[:1]}),
                                                ("4 images", {"images": pictures})]
    lines = [f"{'input':<16} {'tokens':>7} {'encode ms':>10} {'TTFT ms':>9} {'prefill tok/s':>14} {'decode tok/s':>13}"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            clip = write_test_clip(f"{tmp}/clip.mkv", size, frames=16)
            cases.append(("video 2 s, 16 fr", {"videos": [clip]}))
        except ImportError:
            lines.append("(no video row: PyAV is not installed)")
        for label, media in cases:
            runs = []
            try:
                for _ in range(repeats):
                    model.engine.reset()
                    model.vision.cache.clear()
                    runs.append(model.generate("Describe what you see.", max_new_tokens=decode_tokens,
                                               ignore_eos=True, **media))
            except EdgeLLMError as e:  # e.g. a long video in a short bundle: say so, keep the other rows
                lines.append(f"{label:<16} {str(e)}")
                continue
            med = lambda f, runs=runs: statistics.median(f(r) for r in runs)  # noqa: E731
            prefill = med(lambda r: r.prompt_tokens / max(r.ttft_s - r.vision_s, 1e-9))
            lines.append(f"{label:<16} {runs[0].prompt_tokens:>7} {med(lambda r: r.vision_s) * 1000:>10.0f} "
                         f"{med(lambda r: r.ttft_s) * 1000:>9.0f} {prefill:>14.0f} "
                         f"{med(lambda r: r.decode_tokens_per_s):>13.1f}")
    return "\n".join(lines)


LOOKUP_CODE = '''def add(a, b):
    """Return the sum of a and b."""
    return a + b


def mean(values):
    """Return the mean of a list of numbers."""
    total = 0
    for v in values:
        total = add(total, v)
    return total / len(values)
'''
LOOKUP_TEXT = ("The committee met on Tuesday to review the budget for the coming year. Spending on roads rises by "
               "a tenth, spending on schools by a twentieth, and the reserve fund stays as it is. Two members asked "
               "for more money for the libraries; the chair answered that the libraries would be reviewed in spring.")
LOOKUP_PROMPTS = {"code edit": "Rename the function add to plus everywhere in this code, and give back the whole "
                               f"code:\n\n{LOOKUP_CODE}",
                  "summary": f"Summarise this in two sentences:\n\n{LOOKUP_TEXT}"}


def bench_lookup(model, lookahead: int, decode_tokens: int = 128, repeats: int = 3) -> str:
    """Greedy answers to a code-edit and a summarising prompt, plain and with prompt lookup, alternating; medians.
    A chat bundle answers the prompts as a user turn, a base model completes them."""
    lines = [f"{'prompt lookup':<14} {'tokens':>7} {'plain tok/s':>12} {'lookup tok/s':>13} {'ratio':>6} "
             f"{'drafts kept':>12} {'same text':>10}"]
    for label, prompt in LOOKUP_PROMPTS.items():
        runs: dict[int, list] = {0: [], lookahead: []}
        for _ in range(repeats):
            for k in runs:
                model.engine.reset()
                runs[k].append(model.generate(prompt, max_new_tokens=decode_tokens, prompt_lookup=k))
        rate = {k: statistics.median(r.decode_tokens_per_s for r in rs) for k, rs in runs.items()}
        last = runs[lookahead][-1]
        same = all(a.token_ids == b.token_ids for a, b in zip(runs[0], runs[lookahead]))
        kept = f"{last.accepted}/{last.drafted}"
        lines.append(f"{label:<14} {len(last.token_ids):>7} {rate[0]:>12.1f} {rate[lookahead]:>13.1f} "
                     f"{rate[lookahead] / max(rate[0], 1e-9):>6.2f} {kept:>12} {'yes' if same else 'no':>10}")
    return "\n".join(lines)


def write_test_clip(path: str, size: int, frames: int) -> str:
    import av

    rng = np.random.default_rng(1)
    with av.open(path, "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "bgr0"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def format_table(model, rows: list[dict]) -> str:
    m = model.manifest
    q = m.quantization
    size = m.size_bytes / 2**20
    formats = ", ".join(f"{n}x {kind}" for kind, n in q.matmuls.items()) or f"group {q.group_size}"
    threads = model.engine.threads
    lines = [f"{m.architecture} {q.mode} ({formats}), bundle {size:.0f} MiB, "
             f"{threads} threads, load {model.load_s * 1000:.0f} ms",
             f"matmuls: {model.engine.describe()}",
             f"{'prompt':>7} {'TTFT ms':>9} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MiB':>13}"]
    for r in rows:
        lines.append(f"{r['prompt_tokens']:>7} {r['ttft_ms']:>9.1f} {r['prefill_tok_s']:>14.0f} "
                     f"{r['decode_tok_s']:>13.1f} {r['peak_rss_mib']:>13.0f}")
    return "\n".join(lines)


def profile_decode(model, prompt_tokens: int = 64, tokens: int = 32) -> str:
    """Where one decoded token's time goes: Python around the graph vs the graph, and the graph by op type.
    `model` must be loaded with profile_prefix set (ONNX Runtime's profiler records every node)."""
    engine = model.engine
    engine.reset()
    engine.prefill(list(range(100, 100 + prompt_tokens)))
    token, walls = 100, []
    for _ in range(tokens):
        t = time.perf_counter()
        token = int(np.argmax(engine.decode(token)))
        walls.append(time.perf_counter() - t)
    path = engine.session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    runs = [e for e in events if e.get("name") == "model_run"][-tokens:]
    first_run = runs[0]["ts"]
    by_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_run:
            by_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    wall_us = statistics.median(walls) * 1e6
    run_us = statistics.median(r["dur"] for r in runs)
    kernels_us = sum(by_op.values()) / tokens
    lines = [f"one decoded token after {prompt_tokens} (median of {tokens}; the profiler itself slows ONNX Runtime "
             "down):",
             f"  wall {wall_us:8.0f} us = graph run {run_us:8.0f} us + Python/binding {wall_us - run_us:6.0f} us",
             f"  graph run = kernels {kernels_us:8.0f} us + executor overhead {run_us - kernels_us:6.0f} us",
             f"  {'op type':<34}{'us/token':>10}{'share':>8}{'nodes':>7}"]
    for op, us in by_op.most_common():
        lines.append(f"  {op:<34}{us / tokens:>10.0f}{us / sum(by_op.values()):>8.1%}{count[op] // tokens:>7}")
    return "\n".join(lines)
