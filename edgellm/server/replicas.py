"""`edgellm serve MODEL... --ray`: the same server, its routes and chat page, in Ray Serve replicas (the `ray`
extra). Each replica is one Ray actor holding the models (server/pool.py: loaded on demand, each its batch and
prompt cache) behind the application that `edgellm serve` runs (app.py, not a second implementation); Ray Serve's
HTTP proxy spreads requests over the replicas, on one machine or a cluster (`RAY_ADDRESS`, `ray start --head`),
with a fixed count (`--replicas N`) or autoscaling between two (`--autoscale MIN,MAX`).

Streaming works through Ray Serve's proxy; a client that leaves closes its stream on the replica, which stops the
answer as `edgellm serve` does. /metrics and /health are each replica's own (the proxy answers from one of them).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import EdgeLLMError

APP_NAME = "edgellm"


@dataclass
class ReplicaSettings:
    """What every replica loads its models with (the CLI's serve flags)."""

    device: str = "cpu"
    threads: int | None = None  # per replica (default: the machine's cores shared among its replicas)
    parallel: int | None = None
    cache_mib: int = 256
    check_memory: bool = True
    key_file: str | None = None
    max_request_bytes: int = 32 << 20
    max_queue: int = 64
    api_key: str | None = None
    max_models: int | None = None


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise EdgeLLMError("--ray needs Ray Serve: pip install 'edgellm[ray]'") from e
    return ray, serve


def application(models: list[tuple[str, str]], settings: ReplicaSettings, replicas: int | None = None,
                autoscale: tuple[int, int] | None = None, cpus_per_replica: float = 1.0):
    """The Ray Serve application: `models` [(name, bundle folder)], each replica serving all of them."""
    _, serve = _ray()

    @serve.ingress()
    class EdgeLLMReplica:
        def __init__(self, models: list[tuple[str, str]], settings: dict):
            from .pool import ModelPool, ServedModel

            self.settings = ReplicaSettings(**settings)

            def loader(name: str, path: str):
                def load():
                    from .. import load as load_model
                    from ..runtime.prompt_cache import PromptCache

                    s = self.settings
                    model = load_model(path, device=s.device, threads=s.threads, slots=s.parallel,
                                       check_memory=s.check_memory, key_file=s.key_file)
                    model.prompt_cache = PromptCache(s.cache_mib, model.bundle) if s.cache_mib else None
                    return model, model.prompt_cache
                return load

            self.pool = ModelPool([ServedModel(name, loader(name, path), path=Path(path)) for name, path in models],
                                  max_models=self.settings.max_models, max_queue=self.settings.max_queue)
            with self.pool.use(models[0][0]):  # ready before the proxy sends it requests
                pass

        def __serve_build_asgi_app__(self):
            from .app import create_app

            s = self.settings
            return create_app(pool=self.pool, max_request_bytes=s.max_request_bytes, api_key=s.api_key,
                              max_queue=s.max_queue)

    scaling: dict = {"num_replicas": replicas or 1}
    if autoscale is not None:
        low, high = autoscale
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                          "target_ongoing_requests": max(1, settings.parallel or 4)}}
    deployment = serve.deployment(EdgeLLMReplica, name="EdgeLLMReplica",
                                  ray_actor_options={"num_cpus": cpus_per_replica},
                                  max_ongoing_requests=settings.max_queue + (settings.parallel or 4), **scaling)
    return deployment.bind(models, asdict(settings))


def serve_on_ray(models: list[tuple[str, str]], settings: ReplicaSettings, host: str, port: int,
                 replicas: int | None = None, autoscale: tuple[int, int] | None = None, blocking: bool = True):
    """Start (or join, with RAY_ADDRESS) a Ray cluster and run the replicas behind Ray Serve's HTTP proxy."""
    ray, serve = _ray()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    count = autoscale[1] if autoscale else (replicas or 1)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if settings.threads is None:
        settings.threads = max(1, int(cpus // count))
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(models, settings, replicas, autoscale, cpus_per_replica=min(1.0, cpus / count)),
              name=APP_NAME, route_prefix="/", blocking=blocking)
