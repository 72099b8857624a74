"""``mobillama serve``: the OpenAI-compatible server and the web chat page."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API with a web chat page",
        description="Serve /v1/completions, /v1/chat/completions (streaming with server-sent events) and "
        "/v1/models, GET /health and /ready, and a chat page at /. Binds 127.0.0.1 by default; a "
        "non-loopback --host needs --api-key (or --insecure). Access log: one JSON line per request on "
        "stdout. SIGTERM drains: running requests get --shutdown-timeout seconds, then end with "
        "finish_reason 'abort'. A MobiLlama-V checkpoint (with vision_config.json) also takes "
        "image_url content parts (base64 data URLs; local file paths only under --image-dir) in chat "
        "messages. Browser defences: requests whose Host is not this server's (DNS rebinding) get 421, "
        "a foreign Origin 403, a body that is not application/json 415; no CORS headers are sent.",
    )
    p.add_argument(
        "checkpoint", metavar="CKPT", help="checkpoint directory (plain or quantized) with tokenizer files"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MOBILLAMA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOBILLAMA_API_KEY, which keeps the "
        "key out of the process list)",
    )
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="also answer requests whose Host header is HOST (a name or address, optionally HOST:PORT; "
        "repeatable). Always answered: the --host address, localhost, 127.0.0.1 and [::1] with --port or "
        "no port, and the address a connection arrived on. Any other Host is refused (421) so a web page "
        "cannot reach the server through DNS rebinding. With --host 0.0.0.0 or :: the machine's names are "
        "unknown: list them here; '*' accepts any Host and turns this protection off",
    )
    p.add_argument(
        "--image-dir",
        metavar="DIR",
        help="MobiLlama-V: let image_url name local files (file:// URLs or absolute paths) whose real path, "
        "symlinks resolved, lies inside DIR (default: local paths are refused; data: URLs always work)",
    )
    p.add_argument("--max-concurrency", type=int, default=1, help="generations running at once (default 1)")
    p.add_argument(
        "--queue-size",
        type=int,
        default=16,
        help="requests that may wait for a slot; beyond it: 429 (default 16)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest request body accepted (default 1000000; for a MobiLlama-V checkpoint enough for "
        "one --max-image-bytes image as a base64 data URL)",
    )
    p.add_argument(
        "--max-image-bytes",
        type=int,
        default=20_000_000,
        help="largest image a request may send, decoded data URL or file (MobiLlama-V; default 20000000)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="max_tokens when a request gives none, capped to the room left in the context (default 256)",
    )
    p.add_argument(
        "--model-name", help="model id reported by /v1/models (default: the checkpoint folder name)"
    )
    p.add_argument(
        "--log-prompts", action="store_true", help="include prompt text in the access log (off: privacy)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get to finish after SIGTERM before they are cut (default 30)",
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype (default bf16)")
    p.add_argument(
        "--bits",
        type=int,
        choices=[8, 4],
        help="quantize the weights on the fly to int8 or int4 (less memory)",
    )
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from functools import partial
    from pathlib import Path

    from mobillama.errors import MobiLlamaError
    from mobillama.infer.load import describe_checkpoint
    from mobillama.serve.app import ServeSettings
    from mobillama.serve.security import ANY_HOST, split_host
    from mobillama.serve.server import check_bind, load_generator, run_server

    for name in ("max_concurrency", "max_body_bytes", "default_max_tokens", "max_image_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise MobiLlamaError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.queue_size < 0:
        raise MobiLlamaError(f"--queue-size must be >= 0, got {args.queue_size}")
    if not 0 <= args.port <= 65535:
        raise MobiLlamaError(f"--port must be in 0..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise MobiLlamaError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    check_bind(args.host, args.api_key, args.insecure)  # before loading anything
    for host in args.allowed_host:
        if host.strip() != ANY_HOST and split_host(host) is None:
            raise MobiLlamaError(
                f"--allowed-host {host!r} is not a host name or address (with an optional :PORT)"
            )
    image_dir = None
    if args.image_dir is not None:
        if not os.path.isdir(args.image_dir):
            raise MobiLlamaError(f"--image-dir: not a directory: {args.image_dir}")
        image_dir = os.path.realpath(args.image_dir)
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise MobiLlamaError(f"checkpoint not found: {checkpoint}")
    if args.threads is not None:
        if args.threads < 1:
            raise MobiLlamaError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    max_body = args.max_body_bytes
    if max_body is None:  # a base64 data URL is 4/3 of the image, plus the rest of the request
        max_body = 1_000_000 + (
            args.max_image_bytes * 4 // 3 if describe_checkpoint(checkpoint).is_vision else 0
        )
    settings = ServeSettings(
        model_name=args.model_name or checkpoint.resolve().name,
        api_key=args.api_key or None,
        max_concurrency=args.max_concurrency,
        queue_size=args.queue_size,
        max_body_bytes=max_body,
        max_image_bytes=args.max_image_bytes,
        log_prompts=args.log_prompts,
        default_max_tokens=args.default_max_tokens,
        host=args.host,
        allowed_hosts=tuple(args.allowed_host),
        image_dir=image_dir,
    )
    loader = partial(load_generator, checkpoint, dtype=args.dtype, bits=args.bits)
    run_server(
        loader,
        settings,
        host=args.host,
        port=args.port,
        insecure=args.insecure,
        shutdown_timeout=args.shutdown_timeout,
    )
    return 0
