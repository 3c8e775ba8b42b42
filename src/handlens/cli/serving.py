"""The ``serve`` command: the API, the viewer, health and metrics, in one process or several."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from handlens.cli.context import workspace
from handlens.cli.options import check_choice
from handlens.cli.output import WARNING, handle_errors, stderr

app = typer.Typer()


@app.command("serve")
@handle_errors
def serve_cmd(
    ctx: typer.Context,
    *,
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Server processes.")] = 1,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.01, help="Larger uploads get "
                                                 "413.")] = 20.0,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Larger images get 413.")] = 50_000_000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Predict micro-batch size (1: no "
                                            "batching).")] = 16,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0, help="How long a request waits for a "
                                               "batch.")] = 5.0,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="HANDLENS_API_KEY", help="Key for mutating "
                                                "endpoints (needed off loopback).")] = None,
    cors: Annotated[list[str] | None, typer.Option("--cors", help="Allow this browser origin (repeatable; off by "
                                                   "default).")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", help="A name the service is reached by (repeatable), besides IP addresses, localhost and "
        "this machine's name; other Host headers get 400 (DNS rebinding). '*' turns the check off behind a proxy "
        "that checks it.")] = None,
    max_pixels_in_flight: Annotated[int, typer.Option("--max-pixels-in-flight", min=1, help="Pixels decoded at "
                                                      "once over all requests; others wait.")] = 100_000_000,
    allow_private_urls: Annotated[bool, typer.Option(
        "--allow-private-urls", help="Let import-urls jobs submitted over the API fetch loopback and private "
        "addresses (off: public addresses only, every hop).")] = False,
    broker: Annotated[str | None, typer.Option("--broker", envvar="HANDLENS_BROKER_URL", help="Celery broker for "
                                               "jobs (amqp:// or redis://); none: one local worker process runs "
                                               "them, its queue in the catalog.")] = None,
    runtime: Annotated[str, typer.Option("--runtime", help="What runs predictions: torch, or onnx "
                                         "(onnxruntime, faster on a CPU; each model is exported on first use and "
                                         "cached in the workspace; explanations stay on torch).")] = "torch",
) -> None:
    """Serve the API (/api/v1, OpenAPI at /docs), health (/livez, /readyz) and metrics (/metrics)."""
    import os

    import uvicorn

    from handlens.jobs.broker import broker_url
    from handlens.jobs.local import LocalExecutor
    from handlens.serve.app import SETTINGS_ENV
    from handlens.serve.settings import ServeSettings

    check_choice("--runtime", runtime, ["torch", "onnx"])
    ws = workspace(ctx)
    broker = broker_url(broker)
    settings = ServeSettings(workspace=ws.root, db_url=ws.db_url, host=host, port=port,
                             max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels,
                             batch_size=batch_size, max_wait_ms=max_wait_ms, api_key=api_key,
                             cors_origins=list(cors or []), allowed_hosts=list(allowed_host or []),
                             max_pixels_in_flight=max_pixels_in_flight, broker_url=broker, runtime=runtime,
                             allow_private_urls=allow_private_urls)
    if not settings.loopback and not api_key:
        stderr.print(WARNING, f"serving on {host} without --api-key: read-only endpoints are open to "
                     "the network and mutating ones are refused")
    os.environ[SETTINGS_ENV] = settings.model_dump_json()  # each worker process builds its app from it
    stderr.print(f"handlens serving {ws.root} on http://{host}:{port} (API docs at /docs)"
                 + ("; predictions on onnxruntime" if runtime == "onnx" else ""))
    if broker:  # jobs go to the broker; those left on the catalog's local queue are forwarded to it
        from handlens.jobs.broker import redact
        from handlens.jobs.local import Forwarder

        executor: Any = Forwarder(ws, broker)
        stderr.print(f"jobs: sent to the broker {redact(broker)}; start workers with `handlens worker`")
    else:  # one local worker for the whole service, whatever the number of server processes
        executor = LocalExecutor(ws)
        stderr.print("jobs: run by one local worker process (no --broker); its queue is the catalog")
    executor.start()
    try:
        uvicorn.run("handlens.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")
    finally:
        executor.stop()
