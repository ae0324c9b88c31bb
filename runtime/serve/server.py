"""Binding the socket and running the app under uvicorn until Ctrl-C, which drains the requests in flight (a second
Ctrl-C stops at once)."""
import contextlib
import ipaddress
import socket
import sys

from runtime.errors import K2Error
from runtime.units import format_bytes


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: one the system picks), or a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise K2Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def require_libraries():
    """The server's libraries, checked before a model is loaded: they come with the `serve` extra."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise K2Error(f"k2 serve needs its server libraries ({e.name} is missing): pip install 'k2[serve]'") from None


def run(service, host: str, port: int, api_key: str | None, max_body: int, log_requests: bool = True):
    """Serve `service` until interrupted; the worker is stopped after the last request is answered."""
    import uvicorn

    from runtime.serve.app import Server

    with contextlib.closing(service.worker):  # also when the port cannot be had
        sock = bind(host, port)  # first: a port in use is one line of error, without a warning about serving on it
        if not is_loopback(host) and api_key is None:
            print(f"warning: serving on {host}, reachable from other machines, without an API key: anyone who can "
                  "reach it can use the model (set --api-key or K2_API_KEY)", file=sys.stderr)
        bound_host, bound_port = sock.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host

        @contextlib.asynccontextmanager
        async def lifespan(app):
            worker = service.worker
            engine = worker.engine
            slots_bytes = len(worker.slots) * engine.max_len * engine.bytes_per_token
            print(f"k2 serve: {service.name} on http://{url_host}:{bound_port}/v1 (context {service.context} "
                  f"tokens, {engine.decoder} decode, {len(worker.slots)} slots in {format_bytes(slots_bytes)}, "
                  f"prefix cache up to {format_bytes(worker.store.budget_bytes)}); Ctrl-C to stop", file=sys.stderr,
                  flush=True)
            yield

        app = Server(service, api_key, max_body).app(lifespan)
        config = uvicorn.Config(app, log_level="info" if log_requests else "warning", access_log=log_requests,
                                timeout_graceful_shutdown=None)
        with sock:
            try:
                uvicorn.Server(config).run(sockets=[sock])
            except KeyboardInterrupt:  # uvicorn drained the requests in flight, then raised the Ctrl-C it caught again
                print("k2 serve: stopped", file=sys.stderr)
