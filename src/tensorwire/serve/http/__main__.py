"""``python -m tensorwire.serve.http``: serve SmolLM2-135M-Instruct locally over the OpenAI API.

Plain local generation by default; ``--library PATH`` (or ``--library shipped`` for the
measured SmolLM2 library) adds the controller and the in-process KV loopback, with
``--link-gbps`` the link speed it is told.
"""

from __future__ import annotations

import argparse
import logging
from importlib import resources
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ...control.latency_model import gbps
    from ...kv.profiles import ProfileLibrary
    from ...models import SMOLLM2_NAME
    from . import LocalBackend, ServerDefaults, create_app, serve

    parser = argparse.ArgumentParser(prog="python -m tensorwire.serve.http", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--library", help="profile library JSON, or 'shipped' for the measured SmolLM2 library")
    parser.add_argument("--link-gbps", type=float, help="link speed the controller is told (Gbit/s)")
    parser.add_argument("--slo-ms", type=float, help="default SLO for moving the KV cache (ms)")
    parser.add_argument("--compression", default="auto", help="default: auto, raw or a profile name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    library = None
    if args.library == "shipped":
        with resources.as_file(resources.files("tensorwire") / "data" / "profiles-smollm2-135m.json") as path:
            library = ProfileLibrary.load(path)
    elif args.library:
        library = ProfileLibrary.load(Path(args.library))
    backend = LocalBackend.smollm2(library=library, bandwidth_bps=gbps(args.link_gbps) if args.link_gbps else None)
    defaults = ServerDefaults(compression=args.compression, slo_ms=args.slo_ms)
    app = create_app(backend, model_name=SMOLLM2_NAME, max_context=args.max_context, defaults=defaults,
                     max_in_flight=args.max_in_flight)  # fmt: skip
    try:
        serve(app, host=args.host, port=args.port)
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
