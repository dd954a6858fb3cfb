"""A decoder written as stages (convert --num-device) with each stage in a Ray actor (the `ray` extra), so that a
model too large for one machine runs on several: a placement group puts the stages on the cluster's nodes (spread:
on different nodes where there are; strict-spread: on different nodes or not at all; pack: together), each actor
holds its stage's session and its layers' keys and values for every slot, and a chunk's hand-over (hidden state and
residual stream) goes from one actor to the next through Ray's object store, not through this process. The engine
keeps the cache's bookkeeping here (kv_cache.Slot) and runs the stages through RayStagedRunner: consecutive prefill
chunks overlap, stage k + 1 of one beside stage k of the next, as each actor takes its calls in order.

Every node that runs a stage reads the bundle at the same path (a shared filesystem, or a copy made beforehand).
"""

from __future__ import annotations

import os
import socket
import weakref
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from ..format import Bundle, open_bundle
from ..kernels import KernelUse
from ..kernels import status as kernel_status
from .kv_cache import KvCache
from .lora_slots import LoraSlots
from .runners import Bindings, Runner, Stage, cache_layers
from .sessions import PROVIDERS, open_graph, session_options

PLACEMENTS = {"spread": "SPREAD", "strict-spread": "STRICT_SPREAD", "pack": "PACK"}
PLACEMENT_WAIT_S = 60.0  # how long the cluster may take to find room for the stages before we say it has none


def ray_session():
    """Ray, joined to the cluster at RAY_ADDRESS, or to a local one it starts, unless this process has joined one."""
    try:
        import ray
    except ImportError as e:
        raise EdgeLLMError("Ray is not installed: pip install 'edgellm[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    return ray


class StageWorker:
    """A stage in a Ray actor: its session, opened from the bundle at `path` on the actor's node, and its layers'
    keys and values for every slot (a cache of all layers whose other layers are never written, so cost nothing:
    kv_cache.lazy_zeros)."""

    def __init__(self, path: str, index: int, device: str, threads: int | None, key: bytes | None):
        if not (Path(path) / "manifest.json").is_file():
            raise EdgeLLMError(f"node {socket.gethostname()} has no bundle at {path}: every node that runs a stage "
                               "reads it at the same path (a shared filesystem, or a copy)")
        self.bundle = open_bundle(path, verify=False)
        self.bundle.key = key
        names = self.bundle.manifest.decoder_stages
        kernels = KernelUse(kernel_status())
        session = open_graph(self.bundle, names[index], session_options(threads, False), PROVIDERS[device], kernels)
        layers = cache_layers(session)
        self.stage = Stage(session, layers, last=index == len(names) - 1)
        self.layers = slice(layers[0], layers[-1] + 1)
        self.kernels = kernels.describe()
        self.cache: KvCache | None = None
        self.bindings: Bindings | None = None
        lora = self.bundle.manifest.lora
        self.lora = LoraSlots(lora) if lora else None  # the adapters, as the engine's (its add_adapter sends them)

    def describe(self) -> dict:
        """What the engine needs to know of this stage: its graph's inputs (name: shape), those it takes from the
        engine or the stage before (Stage.inputs), its layers, its node (host name / Ray node id)."""
        import ray

        node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"  # (a host may run several)
        return {"inputs": {i.name: i.shape for i in self.stage.session.get_inputs()}, "takes": self.stage.inputs,
                "layers": list(range(self.layers.start, self.layers.stop)), "node": node, "kernels": self.kernels}

    def allocate(self, slots: int, position_rows: int) -> None:
        m = self.bundle.manifest
        self.cache = KvCache(m.model.num_hidden_layers, slots, m.model.num_key_value_heads, m.seq_length,
                             m.model.head_dim, m.quantization.kv_dtype, position_rows)
        self.bindings = Bindings(self.cache, self.lora, m.model.vocab_size)

    def add_adapter(self, name: str, modules: dict) -> None:
        assert self.lora is not None and self.bindings is not None
        self.lora.add(name, modules)
        self.bindings.forget_adapter(name)

    def run(self, feed: dict, carried: dict | None, first: int, end: int, single: bool, first_row: bool,
            adapters: tuple = ()):
        """The stage on this actor's cache (`carried`: the previous actor's hand-over, resolved by Ray; `adapters`:
        the LoRA adapter of each slot first..end-1, as the engine's slots say): the next hand-over, or the last
        stage's logits (only the first row's where `first_row`)."""
        assert self.bindings is not None and self.cache is not None, "allocate() comes first"
        for index, adapter in zip(range(first, end), adapters):
            self.cache.slot_at(index).adapter = adapter
        if not self.stage.last:
            return self.stage.hand_over(self.bindings, feed, carried, first, end)
        logits = self.stage.logits(self.bindings, feed, carried, first, end, single)
        return logits[0] if first_row else logits

    def copy_positions(self, source: int, target: int, n: int) -> None:
        assert self.cache is not None
        self.cache.copy_positions(source, target, n)

    def read(self, index: int, n: int) -> np.ndarray:
        assert self.cache is not None
        return np.ascontiguousarray(self.cache.kv[self.layers, :, index, :, :n])

    def write(self, index: int, kv: np.ndarray, length: int) -> None:
        assert self.cache is not None
        self.cache.kv[self.layers, :, index, :, :length] = kv[:, :, :, :length]


def _release(group) -> None:
    """A placement group given back, where Ray still runs (at exit, after ray.shutdown(), there is none to ask)."""
    import ray

    if ray.is_initialized():
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(group)


def error_text(text: str) -> str:
    """What failed inside a Ray actor, from Ray's report of it: the error's own message, without the traceback
    around it."""
    for marker in ("EdgeLLMError: ", "Error: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else "no message"


def _cause(error: BaseException) -> str:
    return error_text(str(error)) if str(error).strip() else type(error).__name__


class RayStages:
    """The actors of a bundle's stages, one per stage, placed by a placement group of one bundle of `threads` CPUs
    (1 when not given) per stage, with `placement` (PLACEMENTS); the group goes when this object does."""

    def __init__(self, bundle: Bundle, device: str, threads: int | None, placement: str):
        if placement not in PLACEMENTS:
            raise EdgeLLMError(f"unknown stage placement {placement!r}: one of {', '.join(PLACEMENTS)}")
        names = bundle.manifest.decoder_stages
        if len(names) < 2:
            raise EdgeLLMError(f"{bundle.path}: its decoder is one graph; stages on Ray need one written as stages "
                               "(edgellm convert --num-device N)")
        ray = ray_session()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cpus = threads or 1
        group = placement_group([{"CPU": cpus}] * len(names), strategy=PLACEMENTS[placement])
        ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_WAIT_S)
        if not ready:
            remove_placement_group(group)
            nodes, total = [n for n in ray.nodes() if n.get("Alive")], ray.cluster_resources().get("CPU", 0)
            raise EdgeLLMError(
                f"the Ray cluster found no room for {len(names)} stages of {cpus} CPU(s) each ({placement}) in "
                f"{PLACEMENT_WAIT_S:.0f} s: it has {len(nodes)} node(s) and {total:.0f} "
                "CPU(s), some maybe taken; add nodes (ray start --address ...), give fewer --threads"
                + (", or place them with spread" if placement == "strict-spread" else ""))
        self._give_back = weakref.finalize(self, _release, group)
        worker = ray.remote(StageWorker)
        self.actors = [worker.options(num_cpus=cpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=k)).remote(str(bundle.path), k, device, threads, bundle.key)
            for k in range(len(names))]
        try:
            described = ray.get([a.describe.remote() for a in self.actors])
        except Exception as e:  # an actor that could not start: its own message, once
            self.close()
            raise EdgeLLMError(f"a stage's actor could not start: {_cause(e)}") from None
        self.inputs = [d["inputs"] for d in described]
        self.takes = [d["takes"] for d in described]
        self.layers = [d["layers"] for d in described]
        self.nodes = [d["node"] for d in described]
        self.kernels = described[0]["kernels"]
        self.lost = False  # a stage's actor (or its node) is gone: the model must be loaded again

    def close(self) -> None:
        """The actors and their placement group go now (else when this object is collected)."""
        import ray

        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor)
        self._give_back()

    def add_adapter(self, name: str, modules: dict) -> None:
        """An adapter for the bundle's LoRA slots, into every stage's actor (each takes its layers' arrays)."""
        self.get([a.add_adapter.remote(name, modules) for a in self.actors])

    def get(self, refs):
        """ray.get, with a stage's failure said as such (failure())."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayError as e:
            raise self.failure(e) from None

    def failure(self, error: BaseException) -> EdgeLLMError:
        """What a stage's call raised, said once: its actor (or node) gone, which leaves these stages `lost`, or
        the stage's own error."""
        import ray

        if isinstance(error, ray.exceptions.RayActorError):
            self.lost = True
            return EdgeLLMError(f"a stage's actor is gone ({_cause(error)}); load the model again")
        return EdgeLLMError(f"a stage failed: {_cause(error)}")


class StageCaches(KvCache):
    """The KV cache's slots (their bookkeeping) here, the keys and values in the stages' actors, each its layers'."""

    def __init__(self, stages: RayStages, slots: int, seq_length: int, position_rows: int):
        super().__init__(0, slots, 0, seq_length, 0, np.float32, position_rows)  # (no keys and values here)
        self.stages = stages
        stages.get([a.allocate.remote(slots, position_rows) for a in stages.actors])

    def copy_positions(self, source: int, target: int, n: int) -> None:
        self.stages.get([a.copy_positions.remote(source, target, n) for a in self.stages.actors])

    def read(self, index: int, n: int) -> np.ndarray:
        return np.concatenate(self.stages.get([a.read.remote(index, n) for a in self.stages.actors]))

    def write(self, index: int, kv: np.ndarray, length: int) -> None:
        self.stages.get([a.write.remote(index, kv[layers[0]:layers[-1] + 1], length)
                         for a, layers in zip(self.stages.actors, self.stages.layers)])


class RayStagedRunner(Runner):
    """The stages' actors called in turn for each chunk or decode step, each given only the inputs its graph takes
    and the reference to the previous actor's hand-over."""

    pipelines = True

    def __init__(self, stages: RayStages, cache: KvCache):
        self.stages, self.cache = stages, cache
        self.futures: list[Future] | None = None  # inside pipelined()

    def _chain(self, feed: dict, first: int, end: int, single: bool, first_row: bool):
        adapters = tuple(self.cache.slot_at(i).adapter for i in range(first, end))
        carried = None
        for actor, takes in zip(self.stages.actors, self.stages.takes):
            given = {name: feed[name] for name in takes if name in feed}
            carried = actor.run.remote(given, carried, first, end, single, first_row, adapters)
        return carried

    def forward(self, feed, slot, start, s, logits_index):
        return self.stages.get(self._chain(feed, slot, slot + 1, len(logits_index) == 1, True))

    def decode_batch(self, feed, first, end):
        return self.stages.get(self._chain(feed, first, end, True, False))

    def submit(self, feed, slot, logits_index):
        assert self.futures is not None, "submit() is for inside pipelined()"
        future = self._chain(feed, slot, slot + 1, len(logits_index) == 1, True).future()
        self.futures.append(future)
        return future

    @contextmanager
    def pipelined(self):
        self.futures = []
        try:
            yield self
        finally:
            futures, self.futures = self.futures, None
            for future in futures:
                error = future.exception()
                if error is not None:
                    raise self.stages.failure(error) from None

