"""A worker process: ``python -m tensorwire.serve.workers {prefill,decode} [options]``.

Each worker loads the model, warms it and the codecs of raw and every profile of the
library (the prefill worker also calibrates the library on this machine), starts
listening, and prints one JSON line to stdout when it is ready: ``{"role": ..., "host": ..., "port": ..., "pid": ...}``. SIGTERM (or
SIGINT) stops it: no new connections, in-flight requests get ``--drain-s`` seconds to
finish, then the process exits 0. ``tensorwire.serve.cluster`` starts and stops these.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ...control import Controller
from ...control.policies import KVServeRule
from ...control.traces import make_trace
from ...data import SAMPLE_TEXT, SMOLLM2_LIBRARY
from ...kv.pipeline import Pipeline
from ...kv.profiles import RAW, ProfileLibrary
from .. import auth
from ...kv.warmup import warm_up
from ..calibration import calibrate
from ..engine import Engine
from ..transport import Netns, TokenBucket, connect, gbps, start_server
from ..pool.session import PoolSession, pool_library
from .decode import DecodeWorker
from .prefill import RAW_PIPELINE, Peer, PrefillWorker

log = logging.getLogger("tensorwire.serve.worker")

CALIBRATION_TOKENS = 1024  # prompt tokens of the cache the workers calibrate and warm their codecs on
PEER_TIMEOUT_S = 30.0  # the transport's default idle timeout (docs/PROTOCOL.md section 7)
HANDSHAKE_TIMEOUT_S = 10.0  # the transport's default handshake deadline (section 3)


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"a number of seconds > 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tensorwire.serve.workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("role", choices=("prefill", "decode"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port (printed when ready)")
    p.add_argument("--secret-file", help="shared secret (default: $TENSORWIRE_SECRET)")
    p.add_argument("--netns", help="the network namespace of the shaped link (tbf): KV sockets are made in it")
    p.add_argument("--drain-s", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--model-folder", help="a transformers model folder, compressed (*.twz, decoded while read) or "
                                          "not (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--library", help="profile library JSON (default: the shipped SmolLM2 library); a decode "
                                     "worker warms its decoders with it")  # fmt: skip
    p.add_argument("--allow-other-library", action="store_true",
                   help="use a library measured on a model of another shape (refused by default)")  # fmt: skip
    g = p.add_argument_group("prefill worker")
    g.add_argument("--decode", action="append", default=[], metavar="HOST:PORT", help="a decode worker (repeatable)")
    g.add_argument("--gbps", type=float, help="link rate for the sender-side token bucket, Gbit/s")
    g.add_argument("--trace", help="follow this bandwidth trace (step, walk, bursty) with the token bucket")
    g.add_argument("--trace-step-s", type=float, default=1.0)
    g.add_argument("--trace-scale", type=float, default=1.0, help="multiply the trace's rates by this")
    g.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time the sender adds per message")
    g.add_argument("--initial-gbps", type=float, help="the controller's first bandwidth estimate (default: --gbps)")
    g.add_argument("--no-calibrate", action="store_true", help="keep the library's offline codec speeds")
    g.add_argument("--pool", metavar="HOST:PORT", help="a Redis KV pool: reuse stored prefixes, store new blocks")
    g.add_argument("--pool-password-file", help="the pool's Redis password (a 0600 file)")
    g.add_argument("--pool-block-tokens", type=int, default=256, help="tokens per pool block")
    g.add_argument("--pool-gbps", type=float, default=10.0, help="the pool link's speed until fetches measure it")
    g.add_argument("--pool-netns", help="make the pool's sockets in this network namespace (its shaped link)")
    g.add_argument("--pool-shared", action="store_true", help="prefixes serve every tenant (default: per API key)")
    g.add_argument("--peer-timeout-s", type=_seconds, default=PEER_TIMEOUT_S,
                   help="idle seconds before a decode worker that sends (or reads) nothing is given up and the "
                        "request retried elsewhere; also bounds connecting and the handshake")  # fmt: skip
    return p


async def _serve(args: argparse.Namespace, handler, on_ready) -> None:
    secret = auth.load_secret(args.secret_file)
    options: dict[str, Any] = {}
    if args.role == "decode" and args.netns:
        options["sock"] = Netns(args.netns).listen_socket(args.host, args.port)
    else:
        options.update(host=args.host, port=args.port)
    server = await start_server(handler, secret=secret, **options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    on_ready(server)
    await stop.wait()
    log.info("stopping: no new connections; %d open", server.connections)
    await _drain(server, args.drain_s)


async def _drain(server, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    server.stop_accepting()
    while server.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await server.close()


def _warm_up_cache(engine: Engine):
    ids = engine.tokenizer(SAMPLE_TEXT.read_text()).input_ids[:CALIBRATION_TOKENS]
    return engine.prefill(ids, observe_window=64)


def _library(args: argparse.Namespace, engine: Engine) -> ProfileLibrary:
    library = ProfileLibrary.load(args.library or SMOLLM2_LIBRARY)
    return library.for_model(engine.shape, allow_other=args.allow_other_library)


def _installed_pipelines(library: ProfileLibrary) -> list[dict]:
    """The pipelines of the profiles whose stages are installed (payloads of the others are refused anyway)."""
    missing = library.check_installed()
    return [p.pipeline for p in library if p.name not in missing]


def _decode(args: argparse.Namespace, engine: Engine):
    library = _library(args, engine)
    usable = _installed_pipelines(library)
    seconds = warm_up([RAW_PIPELINE, *usable], _warm_up_cache(engine))
    log.info("decoders of raw and %d profiles warmed in %.1f s", len(usable), seconds)
    return DecodeWorker(engine).handle


def _prefill(args: argparse.Namespace, engine: Engine):
    library = _library(args, engine)
    cache = _warm_up_cache(engine)
    warm_up([RAW_PIPELINE], cache)  # calibrating warms the profiles
    if args.no_calibrate:
        warm_up(_installed_pipelines(library), cache)
    else:
        library = calibrate(library, cache, log=log.info)
    rate = gbps(args.gbps) if args.gbps else None
    bucket = None
    if args.trace:
        bucket = TokenBucket.from_trace(make_trace(args.trace, 200), args.trace_step_s, scale=args.trace_scale,
                                        rtt_s=args.rtt_ms / 1e3)  # fmt: skip
    elif rate or args.rtt_ms:
        bucket = TokenBucket(rate or math.inf, rtt_s=args.rtt_ms / 1e3)
    initial = gbps(args.initial_gbps) if args.initial_gbps else (bucket.rate if bucket and math.isfinite(bucket.rate) else None)
    controller = Controller(library, initial_bandwidth_bps=initial)
    # KVServe's rule, for requests that name it (control.policy): benchmarks run both side by side.
    alternatives = {"kvserve-rule": KVServeRule(library, initial_bandwidth_bps=initial)}
    secret = auth.load_secret(args.secret_file)
    # A stalled decode worker (stopped, swapping, wedged) is given up after this many idle
    # seconds, whatever it stalls in: connecting, the handshake, the KV transfer, the tokens.
    timeouts = {"read_timeout": args.peer_timeout_s, "write_timeout": args.peer_timeout_s,
                "handshake_timeout": min(HANDSHAKE_TIMEOUT_S, args.peer_timeout_s),
                "connect_timeout": min(HANDSHAKE_TIMEOUT_S, args.peer_timeout_s)}  # fmt: skip

    async def connect_peer(host: str, port: int):
        options: dict[str, Any] = {"secret": secret, **timeouts}
        if args.netns:
            options.update(sock=Netns(args.netns).socket(), link="tbf")
        if bucket is not None:
            options["shaper"] = bucket
        return await connect(host, port, **options)

    peers = [Peer(*_host_port(a)) for a in args.decode]
    pool = _pool(args, engine, library, cache) if args.pool else None
    return PrefillWorker(engine, controller, peers, connect_peer, alternatives=alternatives, pool=pool,
                         shared_pool=args.pool_shared).handle  # fmt: skip


def _pool(args: argparse.Namespace, engine: Engine, library: ProfileLibrary, cache) -> PoolSession:
    """The prefill worker's KV pool on the Redis at ``--pool`` (its profiles: the selector-free ones)."""
    from ...search.objectives import measure_codec
    from ..pool import KVPool, redis_client

    host, port = _host_port(args.pool)
    password = Path(args.pool_password_file).read_text().strip() if args.pool_password_file else None
    client = redis_client(host, port, password, netns=args.pool_netns)
    profiles = pool_library(library)
    pool = KVPool(client, model_id=engine.name, tokenizer_id=engine.tokenizer.name_or_path or engine.name,
                  pipelines={RAW: RAW_PIPELINE, **{p.name: p.pipeline for p in profiles}}, expect=engine.expect,
                  block_tokens=args.pool_block_tokens)  # fmt: skip
    _, _, raw_decode_bps = measure_codec(Pipeline.from_config(RAW_PIPELINE), [cache, cache])
    log.info("KV pool at %s:%d, %d-token blocks, raw and %d profiles", host, port, args.pool_block_tokens, len(profiles))
    return PoolSession(pool, profiles, raw_pipeline=RAW_PIPELINE, raw_decode_bps=raw_decode_bps,
                       initial_bandwidth_bps=gbps(args.pool_gbps), bytes_per_token=cache.nbytes(2) // max(cache.seq_len, 1))


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.role == "prefill" and not args.decode:
        parser.error("a prefill worker needs at least one --decode HOST:PORT")
    logging.basicConfig(level=os.environ.get("TENSORWIRE_LOG", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s {args.role}[%(process)d] %(levelname)s %(message)s")  # fmt: skip
    engine = Engine.load(args.model_folder)
    engine.warm_up()
    handler = (_prefill if args.role == "prefill" else _decode)(args, engine)

    def ready(server) -> None:
        print(json.dumps({"role": args.role, "host": server.host, "port": server.port, "pid": os.getpid()}), flush=True)

    asyncio.run(_serve(args, handler, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
