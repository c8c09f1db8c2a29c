"""Machine-dependent settings: CPU training keeps freed memory for the next step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Allocates and frees two 100 MB tensors per round, as a training step does with its
# activations, and reports the page faults of the last four of sixteen rounds. The heap grows
# to the working set in the first few: alignment remainders and small allocations land between
# the big blocks, so a round can still fault one tensor in; over 40 runs the last round that
# did so was the fifth.
ROUNDS = """
import json, resource, sys
import torch
from finetune.machine import set_cpu_allocator
applied = set_cpu_allocator("keep") if sys.argv[1] == "keep" else False
for round in range(16):
    if round == 12:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(25_000_000)
    y = x * 2
    del x, y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def rounds(mode: str, **env: str) -> dict:
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE") and not k.startswith("MALLOC_")
    }
    environment.update(env)
    run = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    return json.loads(run.stdout.splitlines()[-1])


def test_cpu_training_does_not_page_fault_freed_memory_in_again():
    plain = rounds("plain")
    kept = rounds("keep")
    assert kept["applied"] is True
    # 4 rounds x 200 MB are ~200k faults of 4 KB pages when glibc gives the memory back.
    assert plain["faults"] > 100_000, plain
    assert kept["faults"] < 1_000, kept


def test_users_own_malloc_tuning_is_left_alone():
    tuned = rounds("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000")
    assert tuned["applied"] is False


# Whether a 256 MB tensor, touched, lies in transparent huge pages (the process's AnonHugePages).
HUGE_PAGES = """
import json, sys
from finetune.machine import use_huge_pages_for_tensors
applied = use_huge_pages_for_tensors() if sys.argv[1] == "cli" else False
import torch
x = torch.ones(64_000_000)
rollup = open("/proc/self/smaps_rollup").read().splitlines()
huge = next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))
print(json.dumps({"applied": applied, "huge_mb": huge // 1024}))
"""


def huge_pages(mode: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run = subprocess.run(
        [sys.executable, "-c", HUGE_PAGES, mode],
        capture_output=True,
        text=True,
        env={**environment, **env},
        check=True,
    )
    return json.loads(run.stdout.splitlines()[-1])


def test_the_cli_puts_large_tensors_in_huge_pages():
    from pathlib import Path

    import pytest

    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not setting.exists() or "[never]" in setting.read_text():
        pytest.skip("this kernel has transparent huge pages turned off")
    cli = huge_pages("cli")
    assert cli["applied"] is True
    assert cli["huge_mb"] >= 200, cli  # of the 256 MB tensor
    if "[madvise]" in setting.read_text():  # else the kernel gives huge pages to everyone
        assert huge_pages("plain")["huge_mb"] < 50
    # A user's own setting stands.
    assert huge_pages("cli", THP_MEM_ALLOC_ENABLE="0")["applied"] is False


def test_one_process_never_drives_several_gpus_through_data_parallel():
    import pytest

    from finetune.errors import ModelLoadError
    from finetune.machine import check_one_process_per_gpu

    with pytest.raises(ModelLoadError, match="--num-processes 4"):
        check_one_process_per_gpu(gpus=4, world_size=1)
    check_one_process_per_gpu(gpus=4, world_size=4)  # one process per GPU: fine
    check_one_process_per_gpu(gpus=1, world_size=1)
    check_one_process_per_gpu(gpus=0, world_size=1)


def test_zero3_and_checkpointed_runs_give_freed_memory_back(tmp_path):
    """ZeRO-3 gathers each layer's weights and frees them; kept in the heap they would undo the
    sharding (bench/zero3_load.py). With gradient checkpointing a kept heap fragments (5.5 vs
    1.7 GB peak on a 4096-token SmolLM2 step, bench/peers.py). Only the other runs keep."""
    import yaml

    from finetune.config import load_config
    from finetune.machine import cpu_allocator_mode, shards_parameters

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')

    def config(**options):
        values = {"base_model": "org/model", "datasets": [{"path": str(data), "type": "alpaca"}]}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**values, **options}))
        return load_config(tmp_path / "c.yaml").config

    assert shards_parameters(config(deepspeed="zero3"))
    assert shards_parameters(config(deepspeed="zero3_offload"))
    assert shards_parameters(config(deepspeed={"zero_optimization": {"stage": 3}}))  # a mapping
    assert not shards_parameters(config(deepspeed="zero2"))
    assert not shards_parameters(config())
    assert cpu_allocator_mode(config(deepspeed="zero3")) == "give back"
    assert cpu_allocator_mode(config(gradient_checkpointing=True)) == "give back"
    assert cpu_allocator_mode(config(deepspeed="zero2")) == "keep"
    assert cpu_allocator_mode(config()) == "keep"
