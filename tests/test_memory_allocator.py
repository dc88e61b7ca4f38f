"""mixerdistill.memory: glibc's fixed mmap threshold (opt-in, set by the CLI) and the peak resident set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mixerdistill.memory import ENV_VARIABLE, peak_rss_gb

PROBE = """
from mixerdistill.memory import return_freed_memory
print(return_freed_memory())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_the_threshold_is_set_when_asked_for():
    def probe(**env: str) -> str:
        environment = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
        result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment | env)
        return result.stdout.strip()

    assert probe(**{ENV_VARIABLE: "1"}) == "True"
    assert probe() == "False" and probe(**{ENV_VARIABLE: "0"}) == "False"  # opt-in: it costs speed
    assert probe(**{ENV_VARIABLE: "1", "MALLOC_MMAP_THRESHOLD_": "131072"}) == "False"  # the user's own is kept


def test_peak_rss_covers_what_was_allocated():
    before = peak_rss_gb()
    block = torch.ones(64 << 20)  # 256 MB, touched
    assert peak_rss_gb() >= max(before, 0.25)
    del block


HOLES = """
import torch
from pathlib import Path
from mixerdistill.memory import release_freed_memory

def resident_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) // 1024

big = torch.ones(4 << 20)
del big  # a freed 16 MB mapping raises glibc's mmap threshold: the blocks below land in the heap
blocks = [torch.ones(1 << 19) for _ in range(200)]  # 200 × 2 MB, touched
del blocks[:-1]  # holes below the last block, which pins the top of the heap
before = resident_mb()
release_freed_memory()
print(before, resident_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_freed_heap_pages_go_back_to_the_system():
    result = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, check=True)
    before, after = map(int, result.stdout.split())
    assert before - after > 300  # MB: most of the 398 MB of holes
