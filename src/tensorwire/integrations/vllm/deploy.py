"""Start a vLLM deployment with tensorwire's connector: a prefill/decode pair, or one server with the KV pool.

    .venv-vllm/bin/python -m tensorwire.integrations.vllm.deploy pd   --port 8000 --gbps 1
    .venv-vllm/bin/python -m tensorwire.integrations.vllm.deploy pool --port 8000

``pd``: two vLLM OpenAI servers on this machine, a prefill instance (``kv_producer``: its
connector keeps each prompt's KV in a tensorwire outbox) and a decode instance
(``kv_consumer``: pulls it over tensorwire's transport), the link between them a token
bucket at ``--gbps`` on the prefill side, and the proxy (:mod:`.proxy`) on ``--port``.
``pool``: one vLLM server (``kv_both``) whose connector loads and stores prompt prefixes in
a Redis of its own (:class:`~tensorwire.serve.pool.RedisServer`). Both serve the offline
SmolLM2-135M-Instruct (exported to safetensors) in float32 and stop everything on Ctrl-C.

:class:`Deployment` does the same from Python (the tests and ``benchmarks/vllm`` use it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["Deployment", "main"]

CONNECTOR = {"kv_connector": "TensorwireConnector", "kv_connector_module_path": "tensorwire.integrations.vllm.connector",
             "kv_load_failure_policy": "recompute"}  # fmt: skip


def free_port() -> int:
    """A free port below the kernel's ephemeral range, for a server that binds it later.

    A port the kernel hands out (bind to 0) can be handed out again, to one of the many
    sockets vLLM's processes open, before our server binds it; one outside that range
    cannot be.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10_000, max(low, 10_001))
        with contextlib.suppress(OSError), socket.create_server(("127.0.0.1", port)):
            return port
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class Deployment:
    """``kind`` ``"pd"`` or ``"pool"`` (see the module docstring); a context manager.

    ``url`` is the OpenAI base URL clients use (the proxy's for ``pd``); ``servers`` maps
    ``prefill``/``decode``/``single`` to each vLLM server's base URL.
    """

    def __init__(self, kind: str, *, port: int = 0, gbps: float | None = None, model: str | None = None,
                 max_model_len: int = 4096, pool_block_tokens: int = 256, pool_store: str = "auto",
                 extra: dict[str, Any] | None = None, start_timeout_s: float = 300.0, log_dir: str | None = None,
                 connector: str = "tensorwire"):  # fmt: skip
        if kind not in ("pd", "pool", "single"):
            raise ValueError(f"kind is 'pd', 'pool' or 'single', got {kind!r}")
        if connector not in ("tensorwire", "example"):
            raise ValueError(f"connector is 'tensorwire' or 'example' (vLLM's ExampleConnector, pd only), got {connector!r}")
        self.connector = connector
        # pd: the proxy binds its port itself (0: a free one, taken at bind time, not picked ahead)
        self.kind, self.port, self.gbps = kind, port or (0 if kind == "pd" else free_port()), gbps
        self.model, self.max_model_len = model, max_model_len
        self.pool_block_tokens, self.pool_store = pool_block_tokens, pool_store
        self.extra = dict(extra or {})
        self.start_timeout_s = start_timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._launch: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.servers: dict[str, str] = {}
        self.redis = None
        self._tmp = tempfile.TemporaryDirectory(prefix="tensorwire-vllm-")
        self.log_dir = Path(log_dir or self._tmp.name)
        self._proxy = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> Deployment:
        from ...models import smollm2_folder

        self.model = self.model or str(smollm2_folder())
        try:
            if self.kind == "pool":
                self._start_pool()
            elif self.kind == "single":
                self._server("single", self.port, None, {}, None)
                self._wait(["single"])
            else:
                self._start_pd()
        except BaseException:
            self.stop()
            raise
        return self

    def _server(self, name: str, port: int, role: str | None, extra: dict[str, Any], cpus: str | None) -> None:
        """One vLLM OpenAI server; ``role`` None: without a KV connector."""
        if self.connector == "example":  # vLLM's own, uncompressed: safetensors files in a shared folder
            config = {"kv_connector": "ExampleConnector", "kv_role": role,
                      "kv_connector_extra_config": {"shared_storage_path": str(self.log_dir / "example-kv")}}  # fmt: skip
        else:
            config = {**CONNECTOR, "kv_role": role, "kv_connector_extra_config": {**extra, **self.extra}}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        if cpus is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--served-model-name", "SmolLM2-135M-Instruct", "--dtype", "float32", "--enforce-eager",
                "--max-model-len", str(self.max_model_len), "--no-enable-prefix-caching", "--host", "127.0.0.1",
                "--port", str(port)] + (["--kv-transfer-config", json.dumps(config)] if role else [])  # fmt: skip
        self._launch[name] = (argv, env)
        self._spawn(name)
        self.servers[name] = f"http://127.0.0.1:{port}"

    def _spawn(self, name: str) -> None:
        argv, env = self._launch[name]
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def kill(self, name: str) -> None:
        """SIGKILL one vLLM server (and its engine and worker processes), as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def restart(self, name: str) -> None:
        """Start a killed server again, same command and port; returns once it is healthy."""
        self._spawn(name)
        self._wait([name])

    def _wait(self, names: list[str]) -> None:
        httpx = __import__("httpx")
        deadline = time.monotonic() + self.start_timeout_s
        for name in names:
            while True:
                if self.procs[name].poll() is not None:
                    tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the vLLM {name} server exited with {self.procs[name].returncode}:\n{tail}")
                try:
                    if httpx.get(self.servers[name] + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the vLLM {name} server did not become healthy in {self.start_timeout_s:g} s")
                time.sleep(0.5)

    def _start_pool(self) -> None:
        from ...serve.pool import RedisServer

        self.redis = RedisServer(maxmemory="2gb").start()
        password = self.log_dir / "pool-password"
        password.write_text(self.redis.password)
        password.chmod(0o600)
        pool = {"url": f"redis://127.0.0.1:{self.redis.port}", "password_file": str(password),
                "block_tokens": self.pool_block_tokens, "store": self.pool_store}  # fmt: skip
        if self.gbps:
            pool["gbps"] = self.gbps
        self._server("single", self.port, "kv_both", {"pool": pool}, None)
        self._wait(["single"])

    def _start_pd(self) -> None:
        from ...serve.auth import ensure_secret_file

        secret = ensure_secret_file(self.log_dir / "secret")
        transfer: dict[str, Any] = {"host": "127.0.0.1", "port": free_port()}
        if self.gbps:
            transfer["gbps"] = self.gbps
        common = {"secret_file": str(secret), "transfer": transfer}
        self._server("prefill", free_port(), "kv_producer", common, "0")
        self._server("decode", free_port(), "kv_consumer", common, "1")
        self._wait(["prefill", "decode"])
        self._start_proxy()

    def _start_proxy(self) -> None:
        from ...serve.http.server import BackgroundServer
        from .proxy import create_proxy

        self.proxy_app = create_proxy(self.servers["prefill"], self.servers["decode"])
        self._proxy = BackgroundServer(self.proxy_app, port=self.port).start()
        self.port = self._proxy.port

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
        self._tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=("pd", "pool", "single"))
    p.add_argument("--port", type=int, default=8000, help="the OpenAI endpoint (the proxy's for pd)")
    p.add_argument("--gbps", type=float, help="pd: the prefill->decode link rate (token bucket); pool: its initial estimate")
    p.add_argument("--pool-store", default="auto", help="pool: auto, raw, lossless or a profile name")
    args = p.parse_args(argv)

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    with Deployment(args.kind, port=args.port, gbps=args.gbps, pool_store=args.pool_store) as deployment:
        print(json.dumps({"url": deployment.url + "/v1", "servers": deployment.servers, "logs": str(deployment.log_dir)}),
              flush=True)  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
