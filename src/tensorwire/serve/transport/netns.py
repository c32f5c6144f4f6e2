"""Kernel link shaping: a network namespace whose loopback is shaped by ``tc qdisc ... tbf``.

:class:`Netns` creates a namespace (``ip netns add``), brings its ``lo`` up, shapes it
(``tc qdisc replace dev lo root tbf rate R burst B latency L``), changes the rate live
(``tc qdisc change``, by hand or following a :class:`~tensorwire.control.traces.Trace`),
runs processes inside it (``ip netns exec``) or makes sockets inside it for this process
(a helper thread enters the namespace with ``setns``, creates the socket and exits: the
socket stays in the namespace), and removes everything on :meth:`Netns.close`.

What tbf models and what it does not (docs/PROTOCOL.md, "Link emulation"): every packet
on the namespace's ``lo``, in both directions and from every process, shares one bucket
of rate ``R``; packets beyond ``latency`` of queue are dropped (TCP backs off, as on a
real bottleneck). There is no propagation delay, loss model or jitter (netem is missing).

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), ``ip`` and ``tc``; :func:`kernel_shaping_status`
says whether that works here. Namespaces are named ``tw-<pid>-<random>``, so
:func:`cleanup_stale_namespaces` can remove those left behind by a killed run.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ...control.traces import Trace
from ...errors import ShapingUnavailable
from .shaping import TraceRate

__all__ = [
    "PREFIX",
    "Netns",
    "tbf_args",
    "default_tbf_burst",
    "kernel_shaping_status",
    "cleanup_stale_namespaces",
]

PREFIX = "tw-"
_NAME = re.compile(r"^tw-(\d+)-[0-9a-f]{6}$")
_CLONE_NEWNET = 0x40000000
MIN_TBF_BURST = 128 << 10  # above lo's 64 KiB MTU: tbf drops a packet larger than its bucket


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    return None


def _run(argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ShapingUnavailable(f"`{' '.join(argv)}` could not run: {exc}") from exc
    if done.returncode != 0:
        raise ShapingUnavailable(f"`{' '.join(argv)}` failed with status {done.returncode}: {done.stderr.strip()}")
    return done


def default_tbf_burst(rate: float) -> int:
    """tbf's bucket: 4 ms at ``rate`` (the kernel refills it per timer tick), at least 128 KiB."""
    return int(max(MIN_TBF_BURST, rate * 0.004))


def tbf_args(rate: float, burst: int | None = None, latency_s: float = 0.05) -> list[str]:
    """The ``tbf ...`` arguments of ``tc qdisc`` for ``rate`` bytes/s (tc takes bits)."""
    if not rate > 0 or not latency_s > 0:
        raise ValueError(f"tbf needs rate > 0 bytes/s and latency > 0 s, got rate={rate!r}, latency_s={latency_s!r}")
    burst = default_tbf_burst(rate) if burst is None else int(burst)
    return ["tbf", "rate", f"{int(rate * 8)}bit", "burst", str(burst), "latency", f"{latency_s * 1000:g}ms"]


def _enter_and_call(netns_path: str, fn):
    """Run ``fn()`` in a fresh thread that first joins the network namespace at ``netns_path``."""
    result: dict = {}

    def target() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if hasattr(os, "setns"):  # Python 3.12+
                    os.setns(fd, _CLONE_NEWNET)
                else:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({netns_path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="tensorwire-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class Netns:
    """A network namespace with a shaped loopback. Use as a context manager.

    Examples
    --------
    >>> with Netns() as ns:                                     # doctest: +SKIP
    ...     ns.shape(gbps(1))
    ...     server = await start_server(handler, sock=ns.listen_socket(), link="tbf")
    ...     conn = await connect("127.0.0.1", server.port, sock=ns.socket(), link="tbf")
    """

    def __init__(self, name: str | None = None):
        self.name = name or f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ValueError(f"a namespace name is 1-64 of [A-Za-z0-9_.-], got {self.name!r}")
        self.rate: float | None = None
        self.burst: int | None = None
        self.latency_s = 0.05
        self.rate_changes = 0
        self._ip = _tool("ip")
        self._tc = _tool("tc")
        self._created = False
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._follower: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def create(self) -> Netns:
        """Create the namespace and bring its loopback up; raises :class:`ShapingUnavailable` if not allowed."""
        if self._ip is None:
            raise ShapingUnavailable("`ip` (iproute2) is not installed; install iproute2 or use the token bucket")
        _run([self._ip, "netns", "add", self.name])
        self._created = True
        try:
            _run([self._ip, "-n", self.name, "link", "set", "lo", "up"])
        except ShapingUnavailable:
            self.close()
            raise
        return self

    def __enter__(self) -> Netns:
        return self.create()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- shaping ---------------------------------------------------------------------------
    def _tc_qdisc(self, verb: str, rate: float, burst: int | None, latency_s: float) -> None:
        if self._tc is None:
            raise ShapingUnavailable("`tc` (iproute2) is not installed; install iproute2 or use the token bucket")
        args = tbf_args(rate, burst, latency_s)
        with self._lock:
            _run([self._ip, "netns", "exec", self.name, self._tc, "qdisc", verb, "dev", "lo", "root", *args])
            self.rate, self.burst, self.latency_s = rate, int(args[4]), latency_s

    def shape(self, rate: float, burst: int | None = None, latency_s: float = 0.05) -> None:
        """Shape the namespace's loopback to ``rate`` bytes/s (both directions share it)."""
        self._tc_qdisc("replace", rate, burst, latency_s)

    def set_rate(self, rate: float) -> None:
        """Change the rate live (``tc qdisc change``); the bucket is resized for the new rate."""
        if self.rate is None:
            self.shape(rate)
            return
        self._tc_qdisc("change", rate, max(self.burst or 0, default_tbf_burst(rate)), self.latency_s)
        self.rate_changes += 1

    def follow(self, trace: Trace, step_s: float = 1.0, *, scale: float = 1.0, loop: bool = True) -> None:
        """Follow ``trace`` from now in a background thread: value ``i`` (times ``scale``) from ``i * step_s`` s on."""
        self.stop_following()
        schedule = TraceRate(trace, step_s, scale, loop)
        self.shape(schedule.at(0.0), default_tbf_burst(schedule.peak), self.latency_s)
        self._stop.clear()
        start = time.monotonic()

        def run() -> None:
            step = 1
            while not self._stop.wait(max(0.0, start + step * step_s - time.monotonic())):
                if not loop and step >= len(trace):
                    return
                try:
                    self.set_rate(schedule.at(step * step_s))
                except ShapingUnavailable:
                    return  # the namespace is being removed
                step += 1

        self._follower = threading.Thread(target=run, name=f"tensorwire-follow-{self.name}", daemon=True)
        self._follower.start()

    def stop_following(self) -> None:
        if self._follower is not None:
            self._stop.set()
            self._follower.join(timeout=5.0)
            self._follower = None

    def qdisc(self) -> str:
        """``tc -s qdisc show dev lo`` inside the namespace: the rate, bytes sent, drops."""
        return _run([self._ip, "netns", "exec", self.name, self._tc or "tc", "-s", "qdisc", "show", "dev", "lo"]).stdout

    # -- processes and sockets inside ------------------------------------------------------------
    def command(self, argv: list[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace."""
        return [self._ip or "ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the namespace; it is stopped on :meth:`close` if still running."""
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, argv: list[str], timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), timeout=timeout, **kwargs)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that lives in the namespace (connect it from any thread)."""
        return _enter_and_call(self.path, lambda: socket.socket(family, type))

    def listen_socket(self, host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> socket.socket:
        """A listening TCP socket in the namespace, bound to ``host:port`` (0: a free port)."""
        sock = self.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return sock

    # -- teardown ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop following, stop the processes started inside, delete the namespace (idempotent)."""
        self.stop_following()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3.0)
        self._procs.clear()
        if self._created:
            self._created = False
            _run([self._ip or "ip", "netns", "delete", self.name])

    def __repr__(self) -> str:
        rate = f"{self.rate * 8 / 1e9:.4g} Gbit/s" if self.rate else "unshaped"
        return f"<Netns {self.name} {rate}>"


@functools.lru_cache(maxsize=1)
def kernel_shaping_status() -> tuple[bool, str]:
    """``(True, how)`` when a namespace with tbf can be made here, else ``(False, why not)``.

    Checks Linux, root, ``ip`` and ``tc``, then makes a namespace, shapes it and removes
    it (cached: the answer does not change while the process runs).
    """
    if not sys.platform.startswith("linux"):
        return False, f"kernel shaping needs Linux network namespaces; this is {sys.platform}"
    if os.geteuid() != 0:
        return False, "kernel shaping needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create namespaces and qdiscs"
    missing = [tool for tool in ("ip", "tc") if _tool(tool) is None]
    if missing:
        return False, f"kernel shaping needs iproute2's {' and '.join(missing)}, not found"
    try:
        with Netns() as ns:
            ns.shape(125e6)
            _enter_and_call(ns.path, lambda: None)
    except (ShapingUnavailable, OSError) as exc:
        return False, f"a shaped network namespace cannot be made here: {exc}"
    return True, "root, ip and tc found; a network namespace with tbf on lo works"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_namespaces(prefix: str = PREFIX) -> list[str]:
    """Delete the ``tw-<pid>-*`` namespaces whose creating process is gone; returns their names."""
    ip = _tool("ip")
    if ip is None or not Path("/run/netns").exists():
        return []
    removed = []
    listing = _run([ip, "netns", "list"]).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME.match(name)
        if not name.startswith(prefix) or match is None or _alive(int(match.group(1))):
            continue
        try:
            _run([ip, "netns", "delete", name])
            removed.append(name)
        except ShapingUnavailable:
            pass  # already gone, or busy: the next cleanup tries again
    return removed
