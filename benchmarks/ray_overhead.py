"""What serving through Ray Serve costs against `edgellm serve`, on one machine: SmolLM2's bundle behind edgellm
serve and behind one Ray replica, reached both ways (the front listening itself, as `edgellm serve --ray` runs it,
and behind Ray Serve's HTTP proxy, as a Serve config deploys it), the same streamed chat requests alternating
among the three; TTFT and decode tokens/s as the client sees them, medians, and their differences.

    .venv/bin/python benchmarks/ray_overhead.py [--requests 12] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from ab import column_medians, cpu_flags  # noqa: E402

import edgellm  # noqa: E402
from edgellm.demo import demo_bundle  # noqa: E402
from edgellm.server import create_app  # noqa: E402
from helpers import running_server  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(url: str, tokens: int, i: int) -> tuple[float, float]:
    """(TTFT s, decode tokens/s) of one streamed chat answer, as the client sees them."""
    body = {"messages": [{"role": "user", "content": f"Tell me a story about robot number {i}."}],
            "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    started, first, pieces = time.perf_counter(), None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    pieces += 1
    end = time.perf_counter()
    return first - started, (pieces - 1) / (end - first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    import ray
    from ray import serve

    from edgellm.server.replicas import APP_NAME, ReplicaSettings, application

    print(f"CPU flags: {cpu_flags()}")
    bundle = demo_bundle()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ReplicaSettings(threads=2, parallel=1)
    proxied, listening = "Ray Serve's proxy (a Serve config)", "the front listening (serve --ray)"
    serve.run(application([("smollm2", str(bundle))], settings, replicas=1, cpus_per_replica=1), name=APP_NAME,
              route_prefix="/", blocking=False)
    own_port = free_port()
    serve.run(application([("smollm2", str(bundle))], settings, replicas=1, cpus_per_replica=1,
                          listen=("127.0.0.1", own_port)), name="listening", route_prefix=None, blocking=False)
    runs: dict[str, list] = {"edgellm serve": [], proxied: [], listening: []}
    with running_server(create_app(edgellm.load(bundle, slots=1), "smollm2")) as direct:
        urls = {"edgellm serve": direct, proxied: f"http://127.0.0.1:{port}",
                listening: f"http://127.0.0.1:{own_port}"}
        for url in urls.values():
            timed(url, 8, -1)  # warm
        for i in range(args.requests):
            for name, url in list(urls.items())[::1 if i % 2 == 0 else -1]:
                runs[name].append(timed(url, args.tokens, i))
    serve.shutdown()
    ray.shutdown()
    medians = {name: column_medians(rows) for name, rows in runs.items()}
    for name, (ttft, speed) in medians.items():
        print(f"{name}: TTFT {ttft * 1000:.1f} ms, decode {speed:.1f} tok/s")
    base_ttft, base_speed = medians["edgellm serve"]
    for name in (listening, proxied):
        ttft, speed = medians[name]
        print(f"{name} against edgellm serve: TTFT {1000 * (ttft - base_ttft):+.1f} ms, decode "
              f"{speed / base_speed:.3f}x")

if __name__ == "__main__":
    main()
