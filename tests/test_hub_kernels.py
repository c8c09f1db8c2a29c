"""No request to the Hub, and no code from it, when a command imports peft.

bitsandbytes (imported by every `import peft`) asks huggingface.co for a compiled kernel at
import time on CPUs with AVX512-BF16. The check runs in a fresh interpreter that tells
bitsandbytes it runs on such a CPU (so it bites on every machine), online as a user is
(HF_HUB_OFFLINE unset), and records every name lookup and connection Python makes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")

PROBE = """
import importlib.machinery, json, sys

class ClaimAvx512Bf16:  # bitsandbytes.functional.has_avx512bf16 -> True before its CPU ops load
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

network = []
sys.addaudithook(
    lambda event, args: network.append([event, str(args[0])])
    if event in ("socket.getaddrinfo", "socket.connect") else None
)
GUARDED = sys.argv[1] == "guarded"
if GUARDED:
    import finetune  # installs the guard
sys.meta_path.insert(0, ClaimAvx512Bf16())
import peft  # imports bitsandbytes
import bitsandbytes.functional as F
print(json.dumps({"claimed": F.has_avx512bf16(), "network": network}))
"""


def probe(mode: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB_OFFLINE")}
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_importing_peft_under_finetune_asks_the_hub_nothing():
    bare, bare_err = probe("bare")
    assert bare["claimed"]
    # the reference: without finetune's guard, bitsandbytes looks huggingface.co up
    assert any("huggingface.co" in args for _, args in bare["network"]), bare
    assert "kernels-community" in bare_err

    guarded, guarded_err = probe("guarded")
    assert guarded["claimed"]
    assert guarded["network"] == []
    assert "kernels-community" not in guarded_err  # nor a warning about the kernel it skipped
