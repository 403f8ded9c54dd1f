"""Run llama.cpp's HTTP server in-process through the `xllamacpp` wheel (CPU build).

Used when no `llama-server` binary is configured or on PATH. The HTTP API is llama.cpp's own:
`/health` (503 while loading, 200 when ready), `/v1/chat/completions`, `/metrics`, `/slots`.
Run as `python -m reconciler.backends.llamacpp_server --model FILE --port N ...`."""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
import threading

from reconciler.extras import MissingExtra, require


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", required=True, help="GGUF file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--ctx-size", "-c", type=int, default=4096)
    parser.add_argument("--parallel", "-np", type=int, default=1)
    parser.add_argument("--threads", "-t", type=int, default=1)
    parser.add_argument("--alias", action="append", default=[], help="model name to report")
    parser.add_argument("--flash-attn", default="auto", choices=["on", "off", "auto"])
    # As llama-server: the KV cache's element type (f16 by default; q8_0 about halves it).
    cache_types = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
    parser.add_argument("--cache-type-k", "-ctk", choices=cache_types)
    parser.add_argument("--cache-type-v", "-ctv", choices=cache_types)
    parser.add_argument("--n-gpu-layers", "-ngl", type=int, default=0)
    parser.add_argument("--verbosity", type=int, default=2)
    # As llama-server: the host-memory prompt cache, MiB (its default, 8192, let the server
    # grow from 200 MiB to 3.8 GiB); -1 leaves llama.cpp's default, 0 turns it off.
    parser.add_argument(
        "--cache-ram", "-cram", type=int, default=-1, help="prompt cache in host memory, MiB"
    )
    parser.add_argument("--cache-reuse", type=int, default=0,
                        help="min chunk (tokens) reused from the slot's cache by shifting (0: off)")  # fmt: skip
    # As llama-server: /v1/embeddings needs --embeddings and a pooling other than none.
    parser.add_argument(
        "--embeddings", "--embedding", action="store_true", help="serve /v1/embeddings"
    )
    parser.add_argument("--pooling", choices=["none", "mean", "cls", "last", "rank"],
                        help="embedding pooling (default: the model's; decoder models need mean or last)")  # fmt: skip
    parser.add_argument(
        "--shutdown-grace", type=float, default=10.0, help="seconds open streams get on SIGTERM"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        xllamacpp = require(
            "xllamacpp", "cpu", "the embedded llama.cpp server (no llama-server binary configured)"
        )
    except MissingExtra as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx_size
    params.n_parallel = args.parallel
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.n_gpu_layers = args.n_gpu_layers
    params.verbosity = args.verbosity
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    if args.cache_ram >= 0:
        params.cache_ram_mib = args.cache_ram
    params.n_cache_reuse = args.cache_reuse
    if args.alias:
        params.model_alias = set(args.alias)
    if args.embeddings:
        params.embedding = True
    if args.pooling:
        params.pooling_type = getattr(
            xllamacpp.llama_pooling_type, f"LLAMA_POOLING_TYPE_{args.pooling.upper()}"
        )
    if args.cache_type_k:
        params.cache_type_k = getattr(xllamacpp.ggml_type, f"GGML_TYPE_{args.cache_type_k.upper()}")
    if args.cache_type_v:
        params.cache_type_v = getattr(xllamacpp.ggml_type, f"GGML_TYPE_{args.cache_type_v.upper()}")
    flash = {"on": "LLAMA_FLASH_ATTN_TYPE_ENABLED", "off": "LLAMA_FLASH_ATTN_TYPE_DISABLED"}
    if args.flash_attn in flash:
        params.flash_attn_type = getattr(xllamacpp.llama_flash_attn_type, flash[args.flash_attn])

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    server = xllamacpp.Server(params)
    print(f"llamacpp_server: serving {args.model} on {args.host}:{args.port}", flush=True)
    while not stop.wait(1.0):
        pass
    # Deleting the server waits for open streams while holding the GIL, so no Python timer
    # could fire; faulthandler's C-level watchdog bounds the shutdown instead.
    faulthandler.dump_traceback_later(args.shutdown_grace, exit=True)
    del server
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main())
