"""Whether the HuggingFace Hub can be reached: asked before anything is downloaded, answered fast.

A 3-second TCP probe (DNS look-ups ignore socket time-outs, so the probe runs in a thread we stop
waiting for); HF_HUB_OFFLINE=1 means no, without touching the network.
"""
from __future__ import annotations

import os
import socket
import threading

HUB_HOST = "huggingface.co"
HUB_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when HF_HUB_OFFLINE is unset and a TCP connection to the hub opens within `timeout`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(outcome and outcome[0])
