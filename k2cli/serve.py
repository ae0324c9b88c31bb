"""`k2 serve`: an OpenAI- and Anthropic-compatible server for agents, on the engine `k2 chat` uses."""
import os
from pathlib import Path

import typer

from k2cli import options
from runtime.errors import K2Error
from runtime.units import parse_size

DEFAULT_CONTEXT = 32768


def serve(model: str = options.MODEL,
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 reaches other "
                                                               "machines (set --api-key then)."),
          port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free one)."),
          api_key: str = typer.Option(None, "--api-key", envvar="K2_API_KEY", show_envvar=True,
                                      help="Require this key on every endpoint but /health (Authorization: Bearer "
                                           "KEY, or x-api-key: KEY)."),
          ctx: int = typer.Option(DEFAULT_CONTEXT, "--ctx", min=16, help="Context window in tokens, prompt and reply "
                                                                        "together (capped at the model's)."),
          name: str = typer.Option(None, "--served-model-name", help="The model's name in /v1/models and replies "
                                                                     "(default: the folder's name)."),
          max_body: str = options.size_option("8MiB", "--max-body", "Largest request body accepted."),
          max_batch: int = typer.Option(4, "--max-batch", min=1, help="Requests decoded together; each holds a cache "
                                                                       "slot of --ctx tokens, allocated at start."),
          max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests that may wait for a slot; past them "
                                                                       "the server answers 429 at once."),
          cache_budget: str = options.size_option("4GiB", "--cache-budget", "Host memory for finished requests' "
                                                  "caches, which later requests that begin alike (an agent's next "
                                                  "turn) reuse; least recently used dropped first. 0: only what the "
                                                  "slots hold."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not log each request."),
          device: str = options.DEVICE, dtype: str = options.DTYPE, plan: Path = options.PLAN,
          device_map: str = options.DEVICE_MAP, eager: bool = options.EAGER, threads: int = options.THREADS,
          int8: bool = options.INT8):
    """Serve MODEL over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) and Anthropic's
    (/v1/messages, /v1/messages/count_tokens), for agents and any client of either.

    Point a client at http://HOST:PORT/v1 (OpenAI) or http://HOST:PORT (Anthropic). Up to --max-batch requests
    decode together, joining and leaving between steps; a request reuses the cached beginning it shares with an
    earlier one. GET /metrics reports in Prometheus' format. A client that disconnects stops its generation.
    Ctrl-C finishes the requests in flight, then exits; a second Ctrl-C exits at once.
    """
    from runtime.serve.server import require_libraries, run
    from runtime.serve.service import Service
    from runtime.serve.worker import Worker

    require_libraries()
    limit = parse_size(max_body, "--max-body")
    budget = parse_size(cache_budget, "--cache-budget")
    if api_key is not None and not api_key.strip():
        raise K2Error("--api-key is empty")
    loaded = options.load_to_run(model, device, dtype, plan, device_map, threads, int8)
    if loaded is None:
        return
    try:
        if not loaded.has_tokenizer:
            raise K2Error(f"{loaded.folder} has no tokenizer (tiktoken.model or tokenizer.json): the server needs one")
        loaded.template  # a model without a chat template fails here, before the port opens
        context = loaded.context(ctx)
        worker = Worker(loaded.engine(max_batch, context, eager=eager), max_queue, budget, log=not quiet)
        service = Service(loaded, worker, context, name or (Path(os.fspath(loaded.folder)).name
                                                            if model != "demo" else "demo"))
        run(service, host, port, api_key, limit, log_requests=not quiet)
    finally:
        loaded.close()
