"""Start and stop a prefill/decode deployment on this machine: each worker its own process.

:class:`Cluster` starts the decode workers, then the prefill worker pointed at them, each
``python -m tensorwire.serve.workers ROLE``, and waits for each one's ready line (its
port). The link between them is shaped by the kernel (a network namespace whose loopback
has a ``tc tbf`` qdisc; the KV sockets of both workers are made in it) where that is
allowed, else by the prefill worker's sender-side token bucket (see docs/PROTOCOL.md,
"Link emulation"). :meth:`Cluster.stop` sends SIGTERM, waits, and kills what is left, so
no process, port or namespace outlives it. :meth:`Cluster.start_decode` and
:meth:`Cluster.start_prefill` are :meth:`Cluster.start` in two steps, for a caller that
puts something between the workers (``tests/serve/workers/test_faults.py``: a proxy that
damages or cuts transfers).

Example
-------
>>> with Cluster(ClusterConfig(gbps=1.0)) as cluster:           # doctest: +SKIP
...     backend = cluster.backend(tokenizer)                     # a Backend for create_app
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, ShapingUnavailable
from . import auth
from .transport import Netns, gbps, kernel_shaping_status
from .transport.link import SHAPERS

__all__ = ["Cluster", "ClusterConfig", "WorkerProcess"]


@dataclass(frozen=True)
class ClusterConfig:
    """One prefill worker, ``decode_workers`` decode workers, and the link between them.

    ``gbps`` (or ``trace``, following :func:`tensorwire.control.traces.make_trace` with
    ``trace_step_s`` seconds per value and rates times ``trace_scale``) is the link;
    ``shaper`` is ``"auto"`` (tbf if allowed, else the token bucket), ``"tbf"``,
    ``"token-bucket"`` or ``"none"``. ``library`` is the profile library (default: the
    shipped SmolLM2 one); ``secret_file`` the shared secret (created when absent).
    ``peer_timeout_s`` is how long the prefill worker waits on a silent decode worker
    (connecting, handshake, transfer, tokens) before it retries the request elsewhere
    (``--peer-timeout-s``); keep it above the longest pause a busy decode worker makes
    between two tokens. ``env`` is added to the workers' environment.

    ``pool``: start a Redis KV pool of ``pool_maxmemory`` (``RedisServer``) for the prefill
    worker, with ``pool_block_tokens``-token blocks; ``pool_shared`` lets every tenant's
    prefixes serve every tenant. ``pool_gbps``: the pool link's rate, shaped by tbf in a
    network namespace of its own (the Redis server runs in it, the prefill worker's pool
    sockets are made in it) where that is allowed, and the worker's first estimate of it;
    None: unshaped loopback (a sender-side token bucket cannot pace a real Redis's replies).
    """

    decode_workers: int = 1
    gbps: float | None = 1.0
    trace: str | None = None
    trace_step_s: float = 1.0
    trace_scale: float = 1.0
    rtt_ms: float = 0.0
    shaper: str = "auto"
    library: str | None = None
    secret_file: str | None = None
    calibrate: bool = True
    host: str = "127.0.0.1"
    prefill_port: int = 0
    start_timeout_s: float = 300.0
    peer_timeout_s: float = 30.0
    env: dict[str, str] = field(default_factory=dict)
    pool: bool = False
    pool_block_tokens: int = 256
    pool_maxmemory: str = "1gb"
    pool_shared: bool = False
    pool_gbps: float | None = None

    def __post_init__(self) -> None:
        if not self.peer_timeout_s > 0:
            raise ValueError(f"peer_timeout_s is > 0 seconds, got {self.peer_timeout_s!r}")


class WorkerProcess:
    """A worker's process, its address once ready, and its log (stderr, kept in a file)."""

    def __init__(self, role: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.role = role
        self.log_path = log_dir / f"{role}-{len(list(log_dir.iterdir()))}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, env=env, start_new_session=True)
        self.host: str | None = None
        self.port: int | None = None

    def wait_ready(self, timeout: float) -> None:
        """Read the ready line; raise :class:`BackendUnavailable` with the log's tail if it never comes."""
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self.proc.stdout.readline().decode()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = found[0] if found else ""
        if not line.strip():
            self.kill()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise BackendUnavailable(f"the {self.role} worker did not start within {timeout:g} s "
                                     f"(exit code {self.proc.poll()}); its log ends with:\n{tail}")  # fmt: skip
        ready = json.loads(line)
        self.host, self.port = ready["host"], int(ready["port"])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s for in-flight requests, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it exited between poll() and here
                pass
            self.proc.wait()


class Cluster:
    """The running deployment of a :class:`ClusterConfig` (a context manager)."""

    def __init__(self, config: ClusterConfig | None = None):
        self.config = config or ClusterConfig()
        self.netns: Netns | None = None
        self.shaper = "none"  # which shaper runs the link: "tbf", "token-bucket" or "none"
        self.decode: list[WorkerProcess] = []
        self.prefill: WorkerProcess | None = None
        self.decode_addresses: list[str] = []  # where the prefill worker sends requests
        self.redis = None  # the KV pool's RedisServer, with config.pool
        self.pool_netns: Netns | None = None  # the pool link's namespace (tbf), with config.pool_gbps
        self.pool_shaper = "none"
        self._shaping: list[str] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="tensorwire-cluster-")
        self.log_dir = Path(self._tmp.name)
        self.secret_file = Path(self.config.secret_file) if self.config.secret_file else self.log_dir / "secret"

    def _shape(self) -> list[str]:
        """Set up the link; returns the prefill worker's shaping arguments."""
        c = self.config
        if c.shaper not in SHAPERS:
            raise ValueError(f"shaper is one of {SHAPERS}, got {c.shaper!r}")
        if c.shaper == "none" or (c.gbps is None and c.trace is None):
            return []
        if c.shaper in ("auto", "tbf") and c.trace is None:
            allowed, why = kernel_shaping_status()
            if allowed:
                self.netns = Netns().create()
                self.netns.shape(gbps(c.gbps))
                self.shaper = "tbf"
                return ["--initial-gbps", str(c.gbps)]
            if c.shaper == "tbf":
                raise ShapingUnavailable(why)
        self.shaper = "token-bucket"  # also for a trace: the bucket follows it in the sender
        if c.trace:
            return ["--trace", c.trace, "--trace-step-s", str(c.trace_step_s), "--trace-scale", str(c.trace_scale)]
        return ["--gbps", str(c.gbps)]

    def start(self) -> Cluster:
        """Start the decode workers, then the prefill worker pointed at them; returns ``self``."""
        self.start_decode()
        self.start_prefill()
        return self

    def start_decode(self) -> list[WorkerProcess]:
        """Set up the link and start the decode workers (side by side); returns them, ready.

        With :meth:`start_prefill` this is :meth:`start` in two steps, for a caller that
        puts something between the two kinds of worker (a proxy, a fault injector).
        """
        c = self.config
        if self.decode or self.prefill is not None:
            raise RuntimeError("the cluster is already started")
        auth.ensure_secret_file(self.secret_file)
        try:
            self._shaping = self._shape()
            for _ in range(c.decode_workers):  # one by one: a failed start still leaves the others to stop
                self.decode.append(WorkerProcess("decode", self._command("decode"), self._env(), self.log_dir))
            for worker in self.decode:  # they load the model side by side
                worker.wait_ready(c.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.decode

    def start_prefill(self, decode: Sequence[str] | None = None) -> WorkerProcess:
        """Start the prefill worker (after :meth:`start_decode`); returns it, ready.

        ``decode``: the ``HOST:PORT`` addresses it sends requests to, in this order of
        preference (default: the decode workers, ``[w.address for w in self.decode]``).
        Under the ``tbf`` shaper the prefill worker connects from inside the link's network
        namespace, so the addresses must be reachable there; with ``"token-bucket"`` or
        ``"none"`` they are on the host's network.
        """
        c = self.config
        if self.prefill is not None:
            raise RuntimeError("the prefill worker is already started")
        addresses = [w.address for w in self.decode] if decode is None else [str(a) for a in decode]
        if not addresses:
            raise ValueError("the prefill worker needs at least one decode worker address (start_decode first)")
        try:
            argv = [*self._command("prefill"), "--port", str(c.prefill_port), *self._shaping, *self._start_pool()]
            argv += [arg for address in addresses for arg in ("--decode", address)]
            argv += ["--rtt-ms", str(c.rtt_ms)] if c.rtt_ms else []
            argv += [] if c.calibrate else ["--no-calibrate"]
            argv += ["--peer-timeout-s", str(c.peer_timeout_s)]
            self.prefill = WorkerProcess("prefill", argv, self._env(), self.log_dir)
            self.prefill.wait_ready(c.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.decode_addresses = addresses
        return self.prefill

    def _start_pool(self) -> list[str]:
        """Start the pool's Redis (config.pool); returns the prefill worker's pool arguments."""
        c = self.config
        if not c.pool:
            return []
        from .pool import RedisServer

        argv: list[str] = []
        if c.pool_gbps is not None:
            argv += ["--pool-gbps", str(c.pool_gbps)]
            allowed, why = kernel_shaping_status()
            if allowed:
                self.pool_netns = Netns().create()
                self.pool_netns.shape(gbps(c.pool_gbps))
                self.pool_shaper = "tbf"
                argv += ["--pool-netns", self.pool_netns.name]
        self.redis = RedisServer(maxmemory=c.pool_maxmemory,
                                 netns=self.pool_netns.name if self.pool_netns else None).start()  # fmt: skip
        password = self.log_dir / "pool-password"
        password.touch(mode=0o600)
        password.write_text(self.redis.password)
        argv += ["--pool", f"{self.redis.host}:{self.redis.port}", "--pool-password-file", str(password),
                 "--pool-block-tokens", str(c.pool_block_tokens)]  # fmt: skip
        return argv + (["--pool-shared"] if c.pool_shared else [])

    def pool_client(self):
        """A ``redis.Redis`` on the cluster's pool (``tensorwire pool stats``, tests)."""
        if self.redis is None:
            raise BackendUnavailable("the cluster has no KV pool (ClusterConfig(pool=True))")
        return self.redis.client()

    def _command(self, role: str) -> list[str]:
        c = self.config
        argv = [sys.executable, "-m", "tensorwire.serve.workers", role, "--host", c.host,
                "--secret-file", str(self.secret_file)]  # fmt: skip
        argv += ["--library", c.library] if c.library else []
        return argv + (["--netns", self.netns.name] if self.netns is not None else [])

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.config.env}

    def backend(self, tokenizer: Any, profiles=()):
        """A front-end :class:`~tensorwire.serve.http.backend.Backend` talking to this cluster."""
        from .workers.backend import WorkerBackend

        if self.prefill is None:
            raise BackendUnavailable("the cluster is not started")
        return WorkerBackend(tokenizer, self.prefill.host, self.prefill.port, secret=auth.load_secret(self.secret_file),
                             profiles=profiles)  # fmt: skip

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """Stop every process (prefill first, so nothing new reaches the decode workers) and the link."""
        codes: dict[str, int | None] = {}
        try:
            if self.prefill is not None:
                codes["prefill"] = self.prefill.stop(timeout)
            for i, worker in enumerate(self.decode):
                codes[f"decode-{i}"] = worker.stop(timeout)
        finally:
            try:
                if self.redis is not None:
                    self.redis.stop()
                    self.redis = None
                if self.pool_netns is not None:
                    self.pool_netns.close()
                    self.pool_netns = None
                if self.netns is not None:
                    self.netns.close()
                    self.netns = None
            finally:
                self._tmp.cleanup()
        return codes

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def tokenizer():
    """SmolLM2's tokenizer alone (the front end counts, templates and detokenizes with it)."""
    from ..errors import require
    from ..models import smollm2_folder

    return require("transformers").AutoTokenizer.from_pretrained(smollm2_folder())


def serve_forever(config: ClusterConfig, *, http_host: str = "127.0.0.1", http_port: int = 8000,
                  defaults: Any = None, max_context: int = 8192) -> None:  # fmt: skip
    """``tensorwire serve``: the workers of ``config`` and the OpenAI API in front, until Ctrl-C or SIGTERM."""
    from ..kv.profiles import ProfileLibrary
    from ..data import SMOLLM2_LIBRARY
    from ..models import SMOLLM2_NAME
    from .http import create_app, serve

    library = ProfileLibrary.load(config.library or SMOLLM2_LIBRARY)
    with Cluster(config) as cluster:
        if cluster.redis is not None:
            print(f"KV pool: {cluster.redis.url} (password in {cluster.log_dir / 'pool-password'}; "
                  f"tensorwire pool stats --url {cluster.redis.url} --password-file ...)", file=sys.stderr, flush=True)  # fmt: skip
        app = create_app(cluster.backend(tokenizer(), profiles=library.names), model_name=SMOLLM2_NAME,
                         max_context=max_context, defaults=defaults)  # fmt: skip
        serve(app, host=http_host, port=http_port)  # uvicorn returns on SIGINT or SIGTERM; then the workers stop
