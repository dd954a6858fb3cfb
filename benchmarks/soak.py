"""A soak of `edgellm serve`: many concurrent clients on loopback for minutes, with cancellations mixed in.

    .venv/bin/python benchmarks/soak.py BUNDLE [--seconds 300] [--clients 32] [--every 30]

The server runs in a process of its own (`edgellm serve BUNDLE --port 0`). Each client loops until the time is up,
choosing per request: a streamed chat answer read to its end (most), a stream closed after its first pieces, or a
non-streamed request abandoned by a client timeout. Every `--every` seconds the server's RSS and open file
descriptors are sampled; at the end the table shows requests, failures (a status other than 200, a stream without
[DONE], a refused connection) and those samples. A test runs a 30-second version (tests/test_soak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write one sentence about the sea.",
             "Count from one to five.", "What is 2 + 2?", "Say hello in Spanish."]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict = field(default_factory=lambda: {"completed": 0, "cancelled streams": 0, "abandoned": 0,
                                                   "failed": 0})
    failures: list = field(default_factory=list)

    def add(self, kind: str, detail: str = "") -> None:
        with self.lock:
            self.counts[kind] += 1
            if detail and len(self.failures) < 10:
                self.failures.append(detail)


def start_server(bundle: str, threads: int | None, *options: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "edgellm.cli", "serve", bundle, "--port", "0", *options]
    if threads:
        command += ["-t", str(threads)]
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in server.stderr:
        found = re.search(r"serving \S+ on (http://[\d.]+:\d+)/", line)
        if found:
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()  # keep it drained
            return server, found.group(1)
    raise RuntimeError(f"the server did not start (exit {server.wait()})")


def sample(pid: int) -> tuple[float, int]:
    """RSS in MiB and open file descriptors of process `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(status.split("VmRSS:")[1].split()[0]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def client(url: str, until: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as http:
        while time.monotonic() < until:
            body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
                    "max_tokens": rng.randint(4, 24), "temperature": rng.choice([0, 0.7])}
            roll = rng.random()
            try:
                if roll < 0.15:  # a stream the client closes after its first pieces
                    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                        for i, _ in enumerate(r.iter_lines()):
                            if i >= 2:
                                break
                    tally.add("cancelled streams")
                elif roll < 0.25:  # a client that gives up waiting
                    try:
                        http.post("/v1/chat/completions", json={**body, "max_tokens": 200}, timeout=0.2)
                        tally.add("completed")
                    except httpx.TimeoutException:
                        tally.add("abandoned")
                else:
                    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                    if r.status_code != 200 or not lines or lines[-1] != "data: [DONE]":
                        tally.add("failed", f"status {r.status_code}, last {lines[-1:] if lines else 'nothing'}")
                    else:
                        for line in lines[:-1]:
                            json.loads(line[len("data: "):])  # every event parses
                        tally.add("completed")
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                tally.add("failed", f"{type(e).__name__}: {e}")


def soak(bundle: str, seconds: float = 300, clients: int = 32, every: float = 30, threads: int | None = None,
         report=print) -> dict:
    """Run the soak; returns {"counts", "failures", "samples": [(seconds, rss MiB, fds)]}."""
    server, url = start_server(bundle, threads)
    tally, samples = Tally(), []
    try:
        started = time.monotonic()
        samples.append((0.0, *sample(server.pid)))
        until = started + seconds
        workers = [threading.Thread(target=client, args=(url, until, i, tally), daemon=True) for i in range(clients)]
        for w in workers:
            w.start()
        next_sample = started + every
        while any(w.is_alive() for w in workers):
            time.sleep(0.2)
            if time.monotonic() >= next_sample:
                samples.append((time.monotonic() - started, *sample(server.pid)))
                report(f"{samples[-1][0]:6.0f} s  RSS {samples[-1][1]:7.1f} MiB  fds {samples[-1][2]:4d}  "
                       f"{tally.counts}")
                next_sample += every
        for w in workers:
            w.join()
        samples.append((time.monotonic() - started, *sample(server.pid)))
        health = httpx.get(f"{url}/health", timeout=30).status_code
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"counts": tally.counts, "failures": tally.failures, "samples": samples, "health": health}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--every", type=float, default=30)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ab import cpu_flags

    print(f"soak of {args.bundle}: {args.clients} clients for {args.seconds:.0f} s; host: {cpu_flags()}")
    out = soak(args.bundle, args.seconds, args.clients, args.every, args.threads)
    print(f"\nrequests: {out['counts']}; health after: {out['health']}")
    for failure in out["failures"]:
        print("  failure:", failure)
    print("\n| time (s) | RSS (MiB) | open fds |\n|---:|---:|---:|")
    for t, rss, fds in out["samples"]:
        print(f"| {t:.0f} | {rss:.1f} | {fds} |")


if __name__ == "__main__":
    main()
