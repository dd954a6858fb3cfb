"""An OpenAI-compatible HTTP server for one bundle, with a chat page: `edgellm serve BUNDLE`.

POST /v1/chat/completions and /v1/completions (server-sent events when "stream" is true), GET /v1/models,
GET /health, GET /metrics and GET / (the page). Answers are written by a runtime.batch.Batcher: as many as the
engine has cache slots decode together, one graph call per step, the rest wait in a bounded queue; finished
sequences stay in the prompt cache, so a client that resends the history with a new turn prefills only that turn.
Requests are checked before anything runs; a bad one gets a 400 with an OpenAI-style error body that names the
field.

protocol.py parses and checks requests and writes the answers' bodies and events; app.py is the application object
(the routes, the Batcher, the metrics); this module listens and serves.
"""

from __future__ import annotations

import errno
import logging
import socket

from ..errors import EdgeLLMError
from .app import MAX_QUEUE, KeyCheck, OpenAIServer, create_app, log
from .protocol import MAX_REQUEST_BYTES, BadRequest, Job, event_json, parse

SHUTDOWN_GRACE_S = 10  # on Ctrl-C / SIGTERM, streams still running after this are cancelled

__all__ = ["BadRequest", "Job", "KeyCheck", "OpenAIServer", "create_app", "event_json", "listen", "parse", "serve"]


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or one clear error (a taken port, an unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog until the server accepts them (the model loads first)
    except OSError as e:
        reason = e.strerror or str(e)
        raise EdgeLLMError(f"cannot listen on {host}:{port}: {reason}"
                           + ("; choose another --port" if e.errno == errno.EADDRINUSE else "")) from None
    return sock


def serve(model, name: str, sock: socket.socket, max_request_bytes: int = MAX_REQUEST_BYTES,
          api_key: str | None = None, max_queue: int = MAX_QUEUE, prompt_cache=None, pool=None) -> None:
    """Serve `model` under `name`, or the models of `pool` (server.pool.ModelPool), on `sock` until Ctrl-C."""
    import uvicorn

    if not log.handlers:  # the request lines, beside uvicorn's access log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s edgellm: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    config = uvicorn.Config(create_app(model, name, max_request_bytes, api_key, max_queue, prompt_cache, pool),
                            log_level="info",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    uvicorn.Server(config).run(sockets=[sock])
