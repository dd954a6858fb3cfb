"""The server's counters, in Prometheus' text format (`GET /metrics`): requests by outcome, tokens, time to first
token and decode speed as histograms, the queue of requests waiting for the model, prompt-cache hits and RSS."""

from __future__ import annotations

import bisect
import os
import threading

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
SPEED_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640)  # decode tokens/s


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}  # outcome (stop, length, stopped, refused...) -> count
        self.tokens = {"prompt": 0, "cached": 0, "completion": 0}
        self.cache_hits = 0  # requests whose prompt started from cached positions: a slot's own, or the prompt cache's
        self.ttft, self.speed = Histogram(TTFT_BUCKETS), Histogram(SPEED_BUCKETS)

    def finished(self, outcome: str, result=None) -> None:
        """A request ended: `outcome` is its finish reason, "stopped" (the client left) or "refused"."""
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1
            if result is not None:
                self.tokens["prompt"] += result.prompt_tokens
                self.tokens["cached"] += result.reused_tokens
                self.tokens["completion"] += len(result.token_ids)
                self.cache_hits += result.reused_tokens > 0
                if result.token_ids:
                    self.ttft.observe(result.ttft_s)
                if result.decode_tokens_per_s > 0:
                    self.speed.observe(result.decode_tokens_per_s)

    def text(self, gauges: dict[str, tuple[float, str]] | None = None) -> str:
        """The counters, and `gauges` {name: (value, help)} read at this moment."""
        with self.lock:
            lines = ["# HELP edgellm_requests_total Requests by how they ended.",
                     "# TYPE edgellm_requests_total counter"]
            lines += [f'edgellm_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            lines += ["# HELP edgellm_tokens_total Prompt tokens (of them taken from the KV cache) and generated ones.",
                      "# TYPE edgellm_tokens_total counter"]
            lines += [f'edgellm_tokens_total{{kind="{k}"}} {v}' for k, v in self.tokens.items()]
            lines += ["# HELP edgellm_prompt_cache_hits Requests whose prompt started from cached positions (a "
                      "slot's own, or the prompt cache's).", "# TYPE edgellm_prompt_cache_hits counter",
                      f"edgellm_prompt_cache_hits {self.cache_hits}"]
            lines += ["# HELP edgellm_ttft_seconds Time to the first token.", "# TYPE edgellm_ttft_seconds histogram",
                      *self.ttft.lines("edgellm_ttft_seconds"),
                      "# HELP edgellm_decode_tokens_per_second Decode speed per request.",
                      "# TYPE edgellm_decode_tokens_per_second histogram",
                      *self.speed.lines("edgellm_decode_tokens_per_second")]
        for key, (value, meaning) in (gauges or {}).items():
            lines += [f"# HELP edgellm_{key} {meaning}", f"# TYPE edgellm_{key} gauge", f"edgellm_{key} {value:g}"]
        lines += ["# HELP edgellm_resident_memory_bytes The server's resident memory.",
                  "# TYPE edgellm_resident_memory_bytes gauge", f"edgellm_resident_memory_bytes {resident_bytes()}"]
        return "\n".join(lines) + "\n"


def merge(texts: dict[str, str], per_replica: bool = False) -> str:
    """Several servers' text() as one (server/replicas.py: a Ray Serve deployment's replicas): every sample summed
    over them, under the names and labels one server gives (its counters, histograms' cumulative buckets and gauges
    all add up), with `edgellm_replicas` their count; or, `per_replica`, each server's samples labelled
    replica="NAME". Each metric's HELP and TYPE come once, its samples after them, as the text format asks."""
    families: dict[str, tuple[list[str], dict[str, float], list[str]]] = {}  # name -> (comments, totals, labelled)
    for replica, text in texts.items():
        current = ""
        for line in text.splitlines():
            if line.startswith("# "):  # "# HELP name ..." / "# TYPE name kind"
                current = line.split()[2]
                comments = families.setdefault(current, ([], {}, []))[0]
                if line not in comments:
                    comments.append(line)
            elif line.strip():
                key, _, value = line.rpartition(" ")
                _, totals, labelled = families.setdefault(current, ([], {}, []))
                totals[key] = totals.get(key, 0.0) + float(value)
                name, brace, labels = key.partition("{")
                labelled.append(f'{name}{{replica="{replica}"' + (f",{labels}" if brace else "}") + f" {value}")
    lines: list[str] = []
    for comments, totals, labelled in families.values():
        lines += comments
        lines += labelled if per_replica else [f"{key} {number(total)}" for key, total in totals.items()]
    lines += ["# HELP edgellm_replicas The replicas these figures are of.", "# TYPE edgellm_replicas gauge",
              f"edgellm_replicas {len(texts)}"]
    return "\n".join(lines) + "\n"


def number(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:.6f}"


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return 0
