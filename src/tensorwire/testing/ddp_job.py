"""A real DDP training job on gloo, for the diagnosis tests and benchmark.

A small byte-level transformer learns the package's sample text; DistributedDataParallel
all-reduces its gradients, with gloo's all-reduce (``--comm allreduce``) or a ring of
point-to-point sends (``--comm ring``, a comm hook, the way ring collectives move data), and
the loss is all-reduced each step for logging, as training loops do. Run it with torchrun::

    torchrun --nproc-per-node 4 -m tensorwire.testing.ddp_job --steps 40

``--device-ms`` adds the time a host spends waiting on its accelerator each step. The
benchmark uses it because this machine runs 4 ranks on 2 cores: when ranks only compute,
one that stalls gives its core to the others and the job hides the stall, which a cluster
with a device per rank would not.

Nothing in it knows about the probe or the faults: `tensorwire diagnose run` and the
``TENSORWIRE_FAULT`` environment variable bring those in from outside.

The PyTorch-only baseline of the benchmark adds ``--monitored-barrier S`` (a
``monitored_barrier`` after each step) and ``--fr-dump DIR`` (each rank writes its Flight
Recorder buffer there at exit, on error, or when ``DIR/dump`` appears).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
import time
from pathlib import Path

__all__ = ["main", "ring_allreduce_hook"]


def ring_allreduce_hook(state, bucket):
    """Average a gradient bucket with a ring all-reduce built from isend / irecv."""
    import torch
    import torch.distributed as dist

    tensor = bucket.buffer()
    world, rank = dist.get_world_size(), dist.get_rank()
    chunks = list(tensor.tensor_split(world))
    right, left = (rank + 1) % world, (rank - 1) % world
    for phase in ("reduce", "gather"):
        for i in range(world - 1):
            offset = 0 if phase == "reduce" else 1
            send, recv = chunks[(rank - i + offset) % world], chunks[(rank - i - 1 + offset) % world]
            buf = torch.empty_like(recv)
            incoming = dist.irecv(buf, left)  # posted first: a slow send never delays our receive
            outgoing = dist.isend(send, right)
            incoming.wait()
            outgoing.wait()
            if phase == "reduce":
                recv += buf
            else:
                recv.copy_(buf)
    tensor.div_(world)
    fut = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def _fr_dumper(folder: Path, rank: int):
    import torch

    done = threading.Event()

    def dump():
        if not done.is_set():
            done.set()
            (folder / f"rank_{rank}").write_bytes(torch._C._distributed_c10d._dump_fr_trace())

    def watch():
        while not done.is_set():
            if (folder / "dump").exists():
                dump()
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return dump


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--comm", choices=("allreduce", "ring"), default="ring")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device-ms", type=float, default=0.0,
                   help="accelerator time per forward, spent waiting as a host waits on its GPU (default 0)")
    p.add_argument("--gloo-timeout", type=float, default=120.0, help="seconds before gloo gives up on a peer")
    p.add_argument("--monitored-barrier", type=float, default=None, metavar="S")
    p.add_argument("--fr-dump", type=Path, default=None, metavar="DIR")
    p.add_argument("--stats", type=Path, default=None, help="rank 0 writes its step times here (JSON)")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..data import SAMPLE_TEXT

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.gloo_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    dump = None
    if args.fr_dump is not None:
        args.fr_dump.mkdir(parents=True, exist_ok=True)
        dump = _fr_dumper(args.fr_dump, rank)
    text = torch.tensor(list(SAMPLE_TEXT.read_bytes()), dtype=torch.long)

    layer = nn.TransformerEncoderLayer(args.dim, 4, 2 * args.dim, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Embedding(256, args.dim), nn.TransformerEncoder(layer, 2), nn.Linear(args.dim, 256))
    ddp = DDP(model)
    if args.comm == "ring":
        ddp.register_comm_hook(None, ring_allreduce_hook)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    step_s = []
    try:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            starts = torch.randint(0, len(text) - args.seq - 1, (args.batch,), generator=gen)
            x = torch.stack([text[s:s + args.seq] for s in starts])
            y = torch.stack([text[s + 1:s + args.seq + 1] for s in starts])
            loss = nn.functional.cross_entropy(ddp(x).reshape(-1, 256), y.reshape(-1))
            if args.device_ms:
                time.sleep(args.device_ms / 1000)
            opt.zero_grad()
            loss.backward()
            opt.step()
            logged = loss.detach().reshape(1)
            dist.all_reduce(logged)
            if args.monitored_barrier is not None:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=args.monitored_barrier),
                                       wait_all_ranks=True)
            step_s.append(time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a rank reports, dumps its Flight Recorder, and fails
        print(f"rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if dump is not None:
            dump()
        return 1
    if dump is not None:
        dump()
    if rank == 0 and args.stats is not None:
        args.stats.write_text(json.dumps({"step_s": step_s, "world": world, "comm": args.comm,
                                          "loss": float(logged) / world, "pid": os.getpid()}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

