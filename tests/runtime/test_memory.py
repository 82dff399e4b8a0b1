"""The server's memory policy: freed activations go back to the operating system (glibc on Linux)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Blocks of a few MB freed between small live ones, as a run's activations are freed between its results:
# glibc's defaults keep them resident once its threshold has followed a larger freed block.
FRAGMENTED = """
import sys
sys.path.insert(0, {root!r})
def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) // 1024
if {policy}:
    from engine.runtime.memory import release_freed_memory
    assert release_freed_memory()
warm = bytearray(16 << 20)
del warm
blocks, survivors = [], []
for _ in range(20):
    blocks.append(bytearray(8 << 20))
    survivors.append(bytearray(4096))
before = rss_mb()
del blocks
print(before - rss_mb())
"""


def _returned_mb(policy: bool) -> int:
    script = FRAGMENTED.format(root=str(ROOT), policy=policy)
    return int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not sys.platform.startswith("linux"),
                    reason="reads resident memory from /proc (Linux)")
def test_freed_blocks_return_to_the_os_under_the_policy_and_not_without_it():
    assert _returned_mb(policy=True) >= 150  # 20 x 8 MB freed
    assert _returned_mb(policy=False) < 50  # glibc's defaults: what the dashboard had before
