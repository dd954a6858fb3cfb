"""A bounded loopback load on `edgellm serve`: aggregate decode tokens/s and TTFT percentiles for several numbers of
concurrent streaming clients (the figures batched decoding is meant to move).

    .venv/bin/python benchmarks/serve_load.py BUNDLE [--clients 1,4,16] [--requests 4] [--max-tokens 64]
        [--parallel N] [--prefix-tokens 1000]

The server runs in a process of its own (`edgellm serve BUNDLE --port 0 [--parallel N]`, as benchmarks/soak.py
starts it). For each client count, every client sends `--requests` streamed chat requests one after another (each a
different question, greedy, `ignore_eos` so every answer is `--max-tokens` long); TTFT is the time to the first
content chunk as the client sees it (queueing included), aggregate tokens/s all tokens over the wall time of that
load; "batch" is the mean number of answers per decode step (the server's /metrics).

Then the prompt cache: one client alternates a completion whose prompt is a `--prefix-tokens` document already in
the cache plus 20 new tokens, and a completion of the 20 new tokens alone; the medians of their TTFTs and their
ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import cpu_flags  # noqa: E402
from soak import start_server  # noqa: E402

TOPICS = ["the sea", "a mountain", "a city at night", "a forest", "the desert", "a river", "snow", "a market"]


def one_request(http: httpx.Client, topic: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed chat request."""
    body = {"messages": [{"role": "user", "content": f"Write about {topic}."}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started, first, tokens = time.perf_counter(), None, 0
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - started), tokens


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    ttfts, tokens, lock = [], [0], threading.Lock()

    def run(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for j in range(requests):
                ttft, n = one_request(http, TOPICS[(i + j) % len(TOPICS)], max_tokens)
                with lock:
                    ttfts.append(ttft)
                    tokens[0] += n

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts.sort()
    return {"tokens/s": tokens[0] / wall, "ttft p50": statistics.median(ttfts),
            "ttft p95": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))], "requests": len(ttfts)}


def batch_counts(url: str) -> tuple[float, float]:
    """(answers decoded, decode steps) so far, from the server's mean batch gauge and its token counter."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    mean = float(values.get("edgellm_batch_mean", 0))
    tokens = float(values.get('edgellm_tokens_total{kind="completion"}', 0))
    return tokens, tokens / mean if mean else 0.0


def completion_ttft(http: httpx.Client, prompt: str) -> float:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - started
    raise RuntimeError("no answer")


def prefix_ttft(url: str, prefix_tokens: int, repeats: int) -> tuple[float, float]:
    """Median TTFTs of (a cached document + 20 new tokens, the 20 new tokens alone), alternating."""
    document = " ".join(f"item{i}" for i in range(prefix_tokens * 3 // 11))  # about 11 tokens per 3 words
    cached, fresh = [], []
    with httpx.Client(base_url=url, timeout=600) as http:
        completion_ttft(http, document)  # computed once; in the prompt cache from now on
        for i in range(repeats):
            tail = " ".join(f"q{i}w{j}" for j in range(5))  # about 20 tokens, new each time
            cached.append(completion_ttft(http, document + " " + tail))
            fresh.append(completion_ttft(http, tail))
    return statistics.median(cached), statistics.median(fresh)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parallel", type=int, default=None, help="the server's --parallel (default: its own)")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="the cached document's length (0: skip)")
    p.add_argument("--repeats", type=int, default=7, help="TTFT pairs for the prompt-cache figure")
    args = p.parse_args()
    options = ["--parallel", str(args.parallel)] if args.parallel else []
    server, url = start_server(args.bundle, args.threads, *options)
    try:
        one_request(httpx.Client(base_url=url, timeout=600), "warming up", 8)
        print(f"{args.bundle}: {args.requests} streamed requests of {args.max_tokens} tokens per client; "
              f"host: {cpu_flags()}\n")
        print("| clients | requests | aggregate tokens/s | TTFT p50 s | TTFT p95 s | batch |\n"
              "|---:|---:|---:|---:|---:|---:|")
        base = None
        for n in [int(x) for x in args.clients.split(",")]:
            before = batch_counts(url)
            out = load(url, n, args.requests, args.max_tokens)
            after = batch_counts(url)
            batch = (after[0] - before[0]) / max(1, after[1] - before[1])
            base = base or out
            print(f"| {n} | {out['requests']} | {out['tokens/s']:.1f} ({out['tokens/s'] / base['tokens/s']:.2f}x) | "
                  f"{out['ttft p50']:.2f} | {out['ttft p95']:.2f} | {batch:.2f} |")
        if args.prefix_tokens:
            cached, fresh = prefix_ttft(url, args.prefix_tokens, args.repeats)
            print(f"\nTTFT, median of {args.repeats}: {args.prefix_tokens} cached tokens + 20 new: "
                  f"{cached * 1000:.0f} ms; the 20 tokens alone: {fresh * 1000:.0f} ms ({cached / fresh:.2f}x)")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)


if __name__ == "__main__":
    main()
