"""Two real deployments, each started as `python -m tensorwire.integrations.vllm.deploy` starts it.

* pd: a vLLM prefill instance and a vLLM decode instance (two OpenAI servers), tensorwire's
  transport between them, the proxy in front. With the lossless pipeline the decode
  instance's greedy answer is token-identical to one vLLM instance's (the prefill
  instance's own, asked directly); with the controller's choice the answer is reported.
* pool: one vLLM server whose connector stores prefixes in a Redis of its own: a second
  request with the same long prefix is served from the pool.

Runs in the vLLM environment only (``.venv-vllm``); skipped elsewhere, saying so.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM lives in its own environment: bash scripts/setup-vllm.sh, then "
                    ".venv-vllm/bin/python -m pytest tests/integrations/vllm")  # fmt: skip

import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from tensorwire.data import SAMPLE_TEXT  # noqa: E402
from tensorwire.integrations.vllm.deploy import Deployment, free_port  # noqa: E402

pytestmark = pytest.mark.timeout(900)

MODEL = "SmolLM2-135M-Instruct"
PROMPT = SAMPLE_TEXT.read_text()[:3500] + "\n\nQuestion: what is this text about?\nAnswer: It is about"


def complete(url: str, prompt: str, **extra) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 0, **extra}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def transfers(log) -> list[dict]:
    """The prefill instance's transfer records (one JSON object a log line)."""
    import json

    marker = "tensorwire.vllm: transfer "
    return [json.loads(line[line.index(marker) + len(marker):]) for line in log.read_text(errors="replace").splitlines()
            if marker in line]  # fmt: skip


def tokens(reply: dict) -> list[str]:
    return reply["choices"][0]["logprobs"]["tokens"]


def test_a_prefill_decode_pair_moves_the_kv_and_a_lossless_transfer_changes_no_token():
    with Deployment("pd", gbps=1.0) as pd:
        single = complete(pd.servers["prefill"], PROMPT)  # one vLLM instance doing both
        lossless = complete(pd.url, PROMPT, kv_transfer_params={"tensorwire": {"compression": "lossless"}})
        transfer = pd.proxy_app.state.transfers[-1]["tensorwire_transfer"]
        assert transfer["tokens"] >= 512
        assert tokens(lossless) == tokens(single)
        assert "transfer for" not in (pd.log_dir / "decode.log").read_text(errors="replace")  # no failed pull
        auto = complete(pd.url, PROMPT, kv_transfer_params={"tensorwire": {"max_ppl_increase": 0.01}})
        agreement = sum(a == b for a, b in zip(tokens(auto), tokens(single))) / len(tokens(single))
        sent = transfers(pd.log_dir / "prefill.log")
        assert [t["profile"] for t in sent[-2:]][0] == "lossless" and sent[-2]["kv_bytes_sent"] > 0
        print(f"\ncontroller's profile {sent[-1]['profile']}: {sent[-1]['kv_bytes_raw'] / sent[-1]['kv_bytes_sent']:.2f}x "
              f"smaller than bf16, greedy agreement with one instance {agreement:.0%}")
        assert tokens(auto)[:1] == tokens(single)[:1]

        # A transfer that cannot be pulled (its prefill instance gone): vLLM recomputes the prompt.
        gone = {"tensorwire_transfer": {**transfer, "port": free_port(), "id": "gone"}}
        recomputed = complete(pd.servers["decode"], PROMPT, kv_transfer_params=gone)
        assert tokens(recomputed) == tokens(single)
        assert "transfer for" in (pd.log_dir / "decode.log").read_text(errors="replace")

        # The decode instance crashes and restarts while a request comes: the proxy waits for it,
        # asks again, and the restarted instance pulls the KV the prefill instance kept.
        pd.kill("decode")
        restart = threading.Thread(target=pd.restart, args=("decode",))
        restart.start()
        try:
            after = complete(pd.url, PROMPT, kv_transfer_params={"tensorwire": {"compression": "lossless"}})
        finally:
            restart.join()
        assert tokens(after) == tokens(single) and pd.proxy_app.state.retries == 1


def test_a_prefix_reused_through_the_redis_pool():
    with Deployment("pool", pool_store="lossless") as pool:
        first = complete(pool.url, PROMPT)
        client = pool.redis.client()
        deadline = time.monotonic() + 60
        while not list(client.scan_iter(match="tw:pool:*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(client.scan_iter(match="tw:pool:*")), "the first request's blocks were not stored"
        second = complete(pool.url, PROMPT)
        assert tokens(second) == tokens(first)
        assert "pool: fetch" in (pool.log_dir / "single.log").read_text(errors="replace")  # loaded, not recomputed
