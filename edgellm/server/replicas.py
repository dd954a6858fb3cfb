"""`edgellm serve MODEL... --ray`: the same server, its routes and chat page, in Ray Serve replicas (the `ray`
extra). Each replica is one Ray actor holding the models (server/pool.py: loaded on demand, each its batch and
prompt cache) behind the application that `edgellm serve` runs (app.py, not a second implementation). A light front
deployment takes the HTTP requests, computes each one's affinity key (a conversation's opening, a completion's
start) and forwards it through Ray Serve's request router, PrefixAffinityRouter here: a conversation's next turn
goes to the replica whose prompt cache holds it, unless that replica is busy. On one machine or a cluster
(`RAY_ADDRESS`, `ray start --head`), with a fixed count (`--replicas N`) or autoscaling (`--autoscale MIN,MAX`).

Streaming goes through; a client that leaves closes its stream, which stops the answer on its replica. /metrics
adds up every replica's figures (/metrics/replicas: each one's); /health is one replica's (the router picks it).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import EdgeLLMError
from ..loading import LoadOptions, served_loader

try:  # the `ray` extra
    from ray.serve.request_router import FIFOMixin, RequestRouter
except ImportError:  # pragma: no cover - without Ray, --ray says what to install
    FIFOMixin = RequestRouter = object  # type: ignore[misc, assignment]

APP_NAME = "edgellm"
STREAM_WINDOW_S = 0.02  # a streamed answer's pieces travel through Ray at most once per this long
ROUTER = "edgellm.server.replicas:PrefixAffinityRouter"


@dataclass
class ReplicaSettings(LoadOptions):
    """What every replica loads its models with and serves them by (the CLI's serve flags). `threads`: per replica
    (default: the machine's cores shared among its replicas); `prompt_cache`: a folder each replica reads at start
    and writes to, on its own node; `ray_stages`: a staged bundle's stages in actors of their own (runtime/
    ray_stages.py), each replica its own."""

    parallel: int | None = None
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


def affinity_key(body: bytes) -> str | None:
    """What makes requests share a cached prefix: a conversation's model, system prompt and first user turn (its
    later turns resend them), a completion's first 1,024 characters; None for a body without a prompt."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("messages"), list):
        messages = data["messages"]
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                          len(messages) - 1)
        head = [data.get("model"), messages[:first_user + 1]]
    elif isinstance(data.get("input"), (str, list)):  # the Responses API
        items = data["input"] if isinstance(data["input"], list) else [data["input"]]
        head = [data.get("model"), data.get("instructions"), items[:1]]
    elif isinstance(data.get("prompt"), str):
        head = [data.get("model"), data.get("system"), data["prompt"][:1024]]
    else:
        return None
    text = json.dumps(head, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Ray Serve's request router for the replicas: a request whose affinity key a replica served last goes to that
    replica, whose prompt cache holds its prefix, unless `busy_at` requests or more wait there; then, as a request
    without a key, to the replica with the shortest queue among all."""

    def initialize_state(self, busy_at: int = 4, remembered: int = 100_000, **kwargs):
        self.owners: OrderedDict[str, object] = OrderedDict()  # key -> the replica id that served it last
        self.busy_at, self.remembered = busy_at, remembered
        routers().add(self)  # (the front, in this process, asks it which replicas there are: replica_names)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        asked = (pending_request.kwargs or {}) if pending_request is not None else {}
        named = [r for r in candidate_replicas if r.replica_id.unique_id == asked.get("replica")]
        if named:  # a request for one replica (the front's /metrics)
            return [named]
        key = asked.get("affinity")
        owner = next((r for r in candidate_replicas if key is not None and self.owners.get(key) == r.replica_id),
                     None)
        if owner is not None:
            waiting = self.replica_queue_len_cache.get(owner.replica_id)
            if waiting is None or waiting < self.busy_at:
                return [[owner], [r for r in candidate_replicas if r is not owner]]
        return [candidate_replicas]  # the shortest queue among them, as Ray Serve's probes find it

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        key = (pending_request.kwargs or {}).get("affinity")
        if key is not None:
            self.owners[key] = replica_id
            self.owners.move_to_end(key)
            while len(self.owners) > self.remembered:
                self.owners.popitem(last=False)


ROUTERS: weakref.WeakSet = weakref.WeakSet()  # this process's PrefixAffinityRouters (one per handle to replicas)


def routers() -> weakref.WeakSet:
    """ROUTERS of this module as imported by name: Ray Serve ships the router's and the deployments' classes by
    value, each with a copy of the module's globals, so each reaches the one registry through the import system."""
    return importlib.import_module(ROUTER.partition(":")[0]).ROUTERS


def replica_names() -> list[str]:
    """The replicas this process's routers know (Ray Serve keeps their sets current)."""
    return sorted({r.unique_id for router in list(routers()) for r in router.curr_replicas})


def replica_name() -> str:
    """This Ray Serve replica's id (the process id outside Serve)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # (not in a Serve replica: a test's own instance)
        return str(os.getpid())


class ModelReplica:
    """A replica: the models (a ModelPool) behind the application `edgellm serve` runs, answering the HTTP requests
    the front forwards as they came (method, path, query, headers, body), streamed back as ("start", status,
    headers) and then ("body", bytes) items."""

    def __init__(self, models: list[tuple[str, str]], settings: dict):
        from .app import create_app
        from .pool import ModelPool, ServedModel

        self.settings = s = ReplicaSettings(**settings)
        self.pool = ModelPool([ServedModel(name, served_loader(name, path, s, s.parallel, len(models) > 1),
                                           path=Path(path)) for name, path in models],
                              max_models=s.max_models, max_queue=s.max_queue)
        with self.pool.use(models[0][0]):  # ready before requests come
            pass
        self.app = create_app(pool=self.pool, max_request_bytes=s.max_request_bytes, api_key=s.api_key,
                              max_queue=s.max_queue)
        self.name = replica_name()

    def __del__(self):
        """Ray Serve stops the replica: the answers in its slots go to the prompt cache (and its folder), and a
        staged model's actors are given back."""
        self.pool.close()

    def headers(self, start: dict) -> list:
        """A response's headers, and which replica answered, for logs and clients that care."""
        return [*start.get("headers", []), (b"x-edgellm-replica", self.name.encode())]

    async def metrics(self, headers: list, replica: str | None = None) -> tuple[str, int, bytes]:
        """This replica's /metrics (the request's headers carry its API key): (its name, status, body).
        `replica`: the replica the router was asked to pick, this one."""
        status, body = 500, []
        async for item in self.forward("GET", "/metrics", b"", headers, b""):
            if item[0] == "start":
                status = item[1]
            else:
                body.append(item[1])
        return self.name, status, b"".join(body)

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes, affinity=None):
        """Run one HTTP request through the application; yields its response. Closing the generator (the client
        left) tells the application so, which stops the answer."""
        gone = asyncio.Event()
        sent: asyncio.Queue = asyncio.Queue()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await sent.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
                 "raw_path": path.encode(), "query_string": query, "root_path": "", "scheme": "http",
                 "headers": [(bytes(k), bytes(v)) for k, v in headers], "client": None, "server": None}
        task = asyncio.ensure_future(self.app(scope, receive, send))
        loop, last_sent = asyncio.get_running_loop(), float("-inf")
        try:
            while True:
                getter = asyncio.ensure_future(sent.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:  # the application returned: what it sent is all there is
                    getter.cancel()
                    while not sent.empty():
                        message = sent.get_nowait()
                        if message["type"] == "http.response.start":
                            yield ("start", message["status"], self.headers(message))
                        elif message.get("body"):
                            yield ("body", message["body"])
                    task.result()
                    return
                message = getter.result()
                if message["type"] == "http.response.start":
                    yield ("start", message["status"], self.headers(message))
                    continue
                # Each item is a hop through Ray (two, to the client), whose cost on shared cores slows decoding: at
                # most one item per STREAM_WINDOW_S, the pieces that come meanwhile gathered into it; a piece after a
                # pause (the first token, after the prefill) goes at once
                chunks, more = [message.get("body", b"")], message.get("more_body", False)
                until = last_sent + STREAM_WINDOW_S
                while more:
                    if not sent.empty():
                        message = sent.get_nowait()
                    elif loop.time() < until and not task.done():
                        try:
                            message = await asyncio.wait_for(sent.get(), until - loop.time())
                        except asyncio.TimeoutError:
                            break
                    else:
                        break
                    chunks.append(message.get("body", b""))
                    more = message.get("more_body", False)
                if any(chunks):
                    yield ("body", b"".join(chunks))
                    last_sent = loop.time()
                if not more:
                    return
        finally:
            gone.set()
            if not task.done():
                try:
                    await asyncio.wait_for(task, 10)
                except Exception:
                    task.cancel()


KEPT_HEADERS = {"content-type", "cache-control", "x-accel-buffering", "retry-after", "www-authenticate",
                "x-edgellm-replica"}


class Front:
    """The HTTP ingress: reads each request and forwards it, with its affinity key, to the replica the
    PrefixAffinityRouter picks; streams the replica's response back. With `listen` (host, port) it takes the HTTP
    connections itself (uvicorn in this deployment's process, as `edgellm serve --ray` runs it), a hop fewer than
    behind Ray Serve's HTTP proxy (a Serve config's application)."""

    def __init__(self, replicas, listen: tuple[str, int] | None = None):
        self.replicas = replicas
        self.server = None
        if listen is not None:
            import uvicorn

            from . import listen as bind

            sock = bind(*listen)
            self.server = uvicorn.Server(uvicorn.Config(self.asgi, log_level="warning", lifespan="off",
                                                        interface="asgi3"))
            # (Ray Serve runs a deployment's constructor on its event loop, where the server then runs; the task is
            # kept, as the loop holds only a weak reference to it)
            self.serving = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))

    def __del__(self):
        if self.server is not None:
            self.server.should_exit = True

    async def asgi(self, scope, receive, send):
        """The ASGI application of the front's own listener: each request through __call__."""
        from starlette.requests import Request

        response = await self(Request(scope, receive))
        await response(scope, receive, send)

    async def __call__(self, request):
        from starlette.responses import Response, StreamingResponse

        if request.method == "GET" and request.url.path in ("/metrics", "/metrics/replicas"):
            return await self.metrics(request, per_replica=request.url.path.endswith("replicas"))
        body = await request.body()
        stream = self.replicas.options(stream=True).forward.remote(
            request.method, request.url.path, request.url.query.encode(), list(request.headers.raw), body,
            affinity=affinity_key(body))
        _, status, raw = await stream.__anext__()
        headers = {bytes(k).decode(): bytes(v).decode() for k, v in raw if bytes(k).decode().lower() in KEPT_HEADERS}
        kind = headers.get("content-type", "")
        if "text/event-stream" in kind or "ndjson" in kind:
            async def rest():
                try:
                    async for item in stream:
                        yield item[1]
                finally:
                    stream.cancel()  # the client left: the replica's answer stops

            return StreamingResponse(rest(), status_code=status, headers=headers)
        content = b"".join([item[1] async for item in stream])
        return Response(content, status_code=status, headers=headers)

    async def metrics(self, request, per_replica: bool):
        """/metrics of every replica: summed (/metrics, as one server gives them), or each labelled with its replica
        (/metrics/replicas); the first refusal (a wrong API key) as it came."""
        from starlette.responses import Response

        from ..metrics import merge

        headers = list(request.headers.raw)
        names = replica_names()
        if not names:  # (no request routed yet: this first call makes the router, and one replica answers)
            answers = [await self.replicas.metrics.remote(headers)]
        else:
            answers = await asyncio.gather(*(self.replicas.metrics.remote(headers, replica=name) for name in names))
        refused = next((a for a in answers if a[1] != 200), None)
        if refused is not None:
            return Response(refused[2], status_code=refused[1])
        texts = {name: body.decode() for name, _, body in answers}
        return Response(merge(texts, per_replica), media_type="text/plain; version=0.0.4")


def application(models: list[tuple[str, str]], settings: ReplicaSettings, replicas: int | None = None,
                autoscale: tuple[int, int] | None = None, cpus_per_replica: float = 1.0, router: str = ROUTER,
                listen: tuple[str, int] | None = None):
    """The Ray Serve application: the front (HTTP ingress) and the replicas, each serving all of `models`
    [(name, bundle folder)], requests routed by `router` (an import path; PrefixAffinityRouter by default).
    `listen`: the front takes HTTP on (host, port) itself, on this node, instead of behind Ray Serve's proxy."""
    ray, serve = _ray()
    from ray.serve.config import RequestRouterConfig

    scaling: dict = {"num_replicas": replicas or 1}
    if autoscale is not None:
        low, high = autoscale
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                          "target_ongoing_requests": max(1, settings.parallel or 4)}}
    router_settings: dict = {"request_router_class": router, "request_router_kwargs": {}}
    if router == ROUTER:
        router_settings["request_router_kwargs"] = {"busy_at": max(2, settings.parallel or 4)}
    replica = serve.deployment(ModelReplica, name="EdgeLLMReplica", ray_actor_options={"num_cpus": cpus_per_replica},
                               max_ongoing_requests=settings.max_queue + (settings.parallel or 4),
                               request_router_config=RequestRouterConfig(**router_settings), **scaling)
    here = {"resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}} if listen else {}  # (its address)
    front = serve.deployment(Front, name="EdgeLLMFront", ray_actor_options={"num_cpus": 0, **here},
                             max_ongoing_requests=10_000)
    return front.bind(replica.bind(models, asdict(settings)), listen)


def build(args: dict):
    """The application as a Serve config's `import_path` names it (`edgellm.server.replicas:build`), from the
    config's `args`: {"models": [[name, bundle folder], ...] (or {name: folder}), "replicas": N or "autoscale":
    [MIN, MAX], and any ReplicaSettings field ("threads", "parallel", "cache_mib", "api_key", ...)}."""
    if not isinstance(args, dict) or not args.get("models"):
        raise EdgeLLMError("the Serve config's args need 'models': [[name, bundle folder], ...]")
    models = args["models"]
    pairs = list(models.items()) if isinstance(models, dict) else [tuple(m) for m in models]
    known = set(ReplicaSettings.__dataclass_fields__)
    unknown = set(args) - known - {"models", "replicas", "autoscale", "cpus_per_replica"}
    if unknown:
        raise EdgeLLMError(f"unknown args in the Serve config: {', '.join(sorted(unknown))} (known: models, replicas, "
                           f"autoscale, cpus_per_replica, {', '.join(sorted(known))})")
    settings = ReplicaSettings(**{k: v for k, v in args.items() if k in known})
    autoscale = tuple(args["autoscale"]) if args.get("autoscale") else None
    return application([(str(n), str(p)) for n, p in pairs], settings, args.get("replicas"), autoscale,
                       float(args.get("cpus_per_replica", 1.0)))


def serve_on_ray(models: list[tuple[str, str]], settings: ReplicaSettings, host: str, port: int,
                 replicas: int | None = None, autoscale: tuple[int, int] | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster and run the application, its front listening on host:port on
    this node, until Ctrl-C or SIGTERM; then the application goes (its replicas, their models and stage actors)."""
    import signal
    import sys
    import threading

    from ..runtime.ray_stages import ray_session

    _, serve = _ray()
    ray = ray_session()
    # SIGTERM from here on stops the application (ray.init's own handler exits at once, with nothing deleted)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    count = autoscale[1] if autoscale else (replicas or 1)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if settings.ray_stages:  # the stages' actors hold the CPUs (each a node's cores); a replica only samples
        per_replica = 0.0
    else:
        per_replica = min(1.0, cpus / count)
        if settings.threads is None:
            settings.threads = max(1, int(cpus // count))
    try:
        serve.start(http_options={"location": "NoServer"})  # the front listens itself: no proxy hop
        serve.run(application(models, settings, replicas, autoscale, cpus_per_replica=per_replica,
                              listen=(host, port)), name=APP_NAME, route_prefix=None, blocking=False)
        while not stop.wait(1.0):  # (Ctrl-C raises KeyboardInterrupt here)
            pass
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:  # a deployment that could not start: its replicas' own error, once
        raise EdgeLLMError(f"the Ray Serve application did not start: {deployment_failure(serve) or e}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("edgellm: stopping the Ray Serve application", file=sys.stderr)
        serve.delete(APP_NAME)


def deployment_failure(serve) -> str | None:
    """Why a deployment of the application failed, as its replicas said it (ray_stages.error_text of Serve's
    message), or None."""
    try:
        deployments = serve.status().applications[APP_NAME].deployments.values()
    except Exception:  # (no status to read)
        return None
    from ..runtime.ray_stages import error_text

    return next((error_text(d.message) for d in deployments if (d.message or "").strip()), None)
