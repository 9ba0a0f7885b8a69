"""`bigjax serve`: a trained run behind the OpenAI-compatible API."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bigjax.cli.common import add_command, add_run_argument, needs, run_dir, start_jax


def cmd_serve(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """serve a run over the OpenAI API (completions, chat, streaming, metrics)

    Serve a run's latest intact checkpoint over an OpenAI-compatible HTTP API
    (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /tokenize,
    /detokenize, /tokenizer_info) with continuous batching over --slots decode slots.
    SIGTERM or Ctrl-C stops taking requests, finishes those in flight and exits 0.
    """
    for module in ("fastapi", "uvicorn", "prometheus_client", "jinja2"):
        needs(module, "serve", "serve")
    workdir = run_dir(args, "serve")
    from bigjax.serving.server import Options

    opts = Options(
        host=args.host, port=args.port, api_key=args.api_key, slots=args.slots,
        max_waiting=args.max_waiting, max_len=args.max_len, model_name=args.served_model_name,
        tensor=args.tensor, chat_template=args.chat_template,
        max_body_bytes=args.max_body_mb << 20, request_timeout=args.request_timeout,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
    )  # fmt: skip
    from bigjax import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    start_jax(args)
    from bigjax.serving.server import serve_run

    return serve_run(workdir, overrides, opts)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, cmd_serve)
    add_run_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 and tokenizer routes"
    )
    p.add_argument("--slots", type=int, default=8, help="sequences decoded at once")
    p.add_argument("--max-waiting", type=int, default=256, help="queued sequences; more: 429")
    p.add_argument("--max-len", type=int, default=0, help="prompt + generated tokens per "
                   "sequence (default: the run's data.seq_len)")  # fmt: skip
    p.add_argument("--served-model-name", default="", help="default: the run directory's name")
    p.add_argument("--tensor", type=int, default=1, help="devices per tensor-parallel group")
    p.add_argument("--chat-template", default="", help="a Jinja chat template file (default: "
                   "the tokenizer's own, else a plain User:/Assistant: transcript)")  # fmt: skip
    p.add_argument("--max-body-mb", type=int, default=4, help="larger request bodies: 413")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds a client has "
                   "to send a whole request (head and body; the answer is not timed): a head "
                   "not in by then closes the connection, a body gets 408")  # fmt: skip
    p.add_argument("--allowed-origins", default="", help="comma-separated web origins "
                   "(https://host:port) whose pages may call the API from a browser (CORS), or "
                   "*; default: none")  # fmt: skip
    # as `bigjax train`: automatic on Cloud TPU slices and SLURM, explicit elsewhere
    p.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-host)")
    p.add_argument("--num_processes", type=int, help="processes in the job (multi-host)")
    p.add_argument("--process_id", type=int, help="this process's index; 0 serves HTTP")
