"""Fixtures for the export tests: one merged run folder per model family, built once."""

from __future__ import annotations

import pytest
from export_runs import Run, build_run


@pytest.fixture(scope="session")
def run_of(tmp_path_factory, smollm2_dir):
    """`run_of("llama")`: the family's run (export_runs.FAMILY_RUNS), built on first use."""
    built: dict[str, Run] = {}

    def get(family: str) -> Run:
        if family not in built:
            built[family] = build_run(family, tmp_path_factory.mktemp(family), smollm2_dir)
        return built[family]

    return get
