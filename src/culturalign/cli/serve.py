"""`culturalign serve`: the model, its experts and their committee behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

import culturalign.cli.common as common
import culturalign.cli.options as o
from culturalign.cli.common import Command, console
from culturalign.serve.config import ServeConfig

app = typer.Typer()


SERVE_EPILOG = (
    "Limits: requests wait in one queue of at most --max-queue (503 beyond it) for one model worker, which runs up to "
    "--max-batch chat requests (base model and experts mixed) in one generate call, waiting --batch-window-ms for a "
    "batch to fill; committee answers and surveys run one at a time. A request gets 504 after --timeout seconds, "
    "400 when max_tokens is over --max-tokens-limit or its prompt and max_tokens do not fit --max-context, 413 for a "
    "body over 1 MiB. Without --api-key anyone who can reach the port can use the model."
)


@app.command(cls=Command, epilog=SERVE_EPILOG)
def serve(
    experts: Annotated[Optional[Path], o.experts(
        o.EXPERTS_HELP + " No registry for the model: the base model alone is served.")] = None,
    model: o.Model = o.DEFAULT_MODEL,
    host: str = typer.Option("127.0.0.1", "--host", metavar="HOST", help="Address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 (every interface: use --api-key)."),
    port: int = typer.Option(8000, "--port", metavar="PORT", help="TCP port (0: any free port; the address is printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", metavar="KEY", envvar="CULTURALIGN_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on /v1 (401 otherwise; compared in constant time)."),
    max_batch: int = typer.Option(ServeConfig.max_batch, "--max-batch", metavar="N", help="Chat requests per generate call (1: no batching)."),
    batch_window_ms: float = typer.Option(ServeConfig.batch_window_ms, "--batch-window-ms", metavar="MS", help="How long an idle worker waits for a batch to fill, 0-1000 ms."),
    max_queue: int = typer.Option(ServeConfig.max_queue, "--max-queue", metavar="N", help="Requests that may wait for the model; more get 503."),
    max_tokens_limit: int = typer.Option(ServeConfig.max_tokens_limit, "--max-tokens-limit", metavar="N", help="Largest max_tokens a request may ask for."),
    max_context: int = typer.Option(ServeConfig.max_context, "--max-context", metavar="N", help="Prompt tokens (soft prompt included) + max_tokens allowed per request, capped by the model's context."),
    timeout: float = typer.Option(ServeConfig.timeout, "--timeout", metavar="S", help="Seconds a request may take, queue included (504 after)."),
    top_k: Annotated[int, o.top_k("At most K experts answer a committee request (as `ask --top-k`).")] = 3,
    device: o.Device = None,
):
    """Serve the model, its cultural experts and their committee over an OpenAI-compatible HTTP API.

    Models: the base model, culturalign/<CODE> for each expert, culturalign/committee. Point any OpenAI
    client at http://HOST:PORT/v1. Example: culturalign serve --port 8000
    """
    from culturalign.committee.compose import CommitteeConfig
    from culturalign.committee.experts import load_registry, shipped_registry
    from culturalign.serve import create_app
    from culturalign.serve import server as listen

    config = ServeConfig(max_batch=max_batch, batch_window_ms=batch_window_ms, max_queue=max_queue,
                         max_tokens_limit=max_tokens_limit, max_context=max_context, timeout=timeout, api_key=api_key)
    host = listen.check_host(host)
    listen.check_port(port)
    if experts is not None:
        load_registry(experts)  # a bad registry fails before the model loads
    with_committee = experts is not None or shipped_registry(model) is not None
    if not listen.is_loopback(host) and api_key is None:
        console.print(f"[yellow]warning:[/yellow] listening on {escape(host)} without --api-key: anyone who can reach this "
                      "machine can use the model", highlight=False, soft_wrap=True)
    sock = listen.bind(host, port)
    try:
        if with_committee:
            committee = common.load_committee(model, device, experts, top_k, CommitteeConfig.max_new_tokens, CommitteeConfig.seed)
            with console.status("loading the router's sentence encoder ..."):
                committee.router.route("How should I greet my host's parents?")
            lm = committee.backend
        else:
            console.print(f"[yellow]warning:[/yellow] no expert registry for model {escape(model)}: serving the base model "
                          "alone (build one with `culturalign experts build` and pass --experts DIR)", highlight=False,
                          soft_wrap=True)
            committee, lm = None, common.load_model(model, device)
        application = create_app(lm, committee, config)
        _serve_logging()
        names = list(application.state.server.models)
        console.print(f"serving {len(names)} models ({escape(', '.join(names))}) at {listen.url(sock)}/v1"
                      f"{'' if api_key is None else ' (API key required)'}; Ctrl-C stops", highlight=False, soft_wrap=True)
        listen.run(application, sock)
    finally:
        sock.close()
    console.print("stopped", highlight=False)


def _serve_logging() -> None:
    """The server's one line per request, on stderr with a timestamp."""
    logger = logging.getLogger("culturalign.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
