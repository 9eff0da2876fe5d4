"""A parent whose untrusted child answers with a reply that is costly to hash:
``hash_flood_parent.py shared-tuples|colliding-ints``.

Run in its own process by the test: were the decoder to hash such a reply, this
process would hold the GIL in C for hours, and nothing in it (not even a test
timeout) could stop it. It prints one JSON line: how the call ended, whether the
child was killed, and whether a thread that counts kept counting after the call.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipe_rpc
from pipe_rpc._messages import Tag
from tests.isolation_services import Hostile, colliding_int_keys, shared_tuple_set

PAYLOADS = {
    "shared-tuples": lambda: shared_tuple_set(40),  # 2**40 leaves, 170 bytes
    "colliding-ints": lambda: colliding_int_keys(200_000),  # 2 * 10**10 comparisons
}


def main(shape: str) -> None:
    payload = PAYLOADS[shape]()
    beats = 0
    stop = threading.Event()

    def beat() -> None:
        nonlocal beats
        while not stop.is_set():
            beats += 1
            time.sleep(0.001)  # a steady tick, not a wait for a condition

    server = pipe_rpc.spawn(Hostile, untrusted=True, start_method="forkserver")
    ticker = threading.Thread(target=beat, daemon=True)
    ticker.start()
    outcome: dict[str, object] = {"size": len(payload)}
    try:
        assert server.proxy.ping() == "pong"
        try:
            server.proxy.send_reply(int(Tag.RETURN), payload)
        except pipe_rpc.PipeRPCError as exc:
            outcome["error"] = type(exc).__name__
            outcome["message"] = str(exc)
        else:
            outcome["error"] = None
        after_call = beats
        deadline = time.monotonic() + 10
        while beats <= after_call and time.monotonic() < deadline:
            time.sleep(0.001)
        outcome["ticker_alive"] = ticker.is_alive() and beats > after_call
        deadline = time.monotonic() + 10
        while server.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        outcome["child_alive"] = server.is_alive()
    finally:
        stop.set()
        server.close()
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
