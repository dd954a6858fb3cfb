"""A simulation of the replicas' routing over more replicas than this host can run: multi-turn conversations arrive
at random, each turn is routed by a policy, and a replica's prompt cache (an LRU of conversations) either holds the
conversation (a hit: only the new turn is prefilled) or not (the whole history is). Policies: random; Ray Serve's
default, the shorter queue of two random replicas; and PrefixAffinityRouter's rule (the replica that served the
conversation last, unless `busy_at` requests queue there, else the shortest queue). A simulation, stated as one:
service times are drawn, not measured.

    .venv/bin/python benchmarks/router_simulation.py [--replicas 8] [--conversations 400] [--turns 6]
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections import OrderedDict


class Replica:
    def __init__(self, cache_conversations: int):
        self.cache: OrderedDict[int, int] = OrderedDict()  # conversation -> tokens held
        self.capacity, self.busy_until, self.queue = cache_conversations, 0.0, 0

    def serve(self, now: float, conversation: int, history: int, new: int, per_token: float) -> tuple[float, bool]:
        """Start at the later of now and the replica's free time; returns (finish time, whether the cache hit)."""
        hit = self.cache.get(conversation, 0) >= history - new
        prefill = new if hit else history
        start = max(now, self.busy_until)
        self.busy_until = start + prefill * per_token + 64 * per_token * 8  # the prefill, then 64 decoded tokens
        self.cache[conversation] = history + 64
        self.cache.move_to_end(conversation)
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return self.busy_until, hit


SERVICE_S = 1.3  # about one turn's prefill and 64 decoded tokens at the simulated speed


def simulate(policy: str, replicas: int, conversations: int, turns: int, seed: int, load: float,
             busy_at: int = 4) -> dict:
    """`load`: the offered work over the replicas' capacity (conversations start spread to make it so)."""
    rng = random.Random(seed)
    window = conversations * turns * SERVICE_S / (load * replicas)
    pool = [Replica(cache_conversations=16) for _ in range(replicas)]
    owner: dict[int, int] = {}
    events = []  # (arrival time, conversation, turn)
    for c in range(conversations):
        t = rng.uniform(0, window)
        for k in range(turns):
            events.append((t, c, k))
            t += rng.expovariate(1 / 8.0)  # the user reads and types
    events.sort()
    finishing: list[tuple[float, int]] = []
    hits = waits = 0.0
    for now, c, k in events:
        while finishing and finishing[0][0] <= now:
            _, r = heapq.heappop(finishing)
            pool[r].queue -= 1
        if policy == "random":
            r = rng.randrange(replicas)
        elif policy == "power of two":
            a, b = rng.sample(range(replicas), 2)
            r = a if pool[a].queue <= pool[b].queue else b
        else:  # PrefixAffinityRouter's rule
            r = owner.get(c, -1)
            if r < 0 or pool[r].queue >= busy_at:
                r = min(range(replicas), key=lambda i: (pool[i].queue, rng.random()))
        owner[c] = r
        history, new = 200 + k * 120, 200 if k == 0 else 56
        done, hit = pool[r].serve(now, c, history, new, per_token=0.002)
        hits += hit and k > 0
        waits += done - now
        pool[r].queue += 1
        heapq.heappush(finishing, (done, r))
    later_turns = conversations * (turns - 1)
    return {"hit rate": hits / later_turns, "mean latency s": waits / len(events)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--conversations", type=int, default=400)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--load", type=float, default=0.7, help="offered work over capacity (default 0.7)")
    args = p.parse_args()
    print(f"simulated: {args.replicas} replicas, {args.conversations} conversations of {args.turns} turns, load "
          f"{args.load:.0%}")
    print("| policy | cache hits on later turns | mean latency (s) |")
    print("|---|---:|---:|")
    for policy in ("random", "power of two", "prefix affinity"):
        r = simulate(policy, args.replicas, args.conversations, args.turns, args.seed, args.load)
        print(f"| {policy} | {r['hit rate']:.1%} | {r['mean latency s']:.2f} |")


if __name__ == "__main__":
    main()
