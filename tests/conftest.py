from __future__ import annotations

import os

import pytest
import torch

from tests.reference import Reference, ReferenceUnavailable, ensure_reference

# CI sets this so that an unreachable oracle fails the run instead of skipping the parity tests.
REQUIRE_REFERENCE = os.environ.get("SAM2_REQUIRE_REFERENCE", "") not in ("", "0")

# Tiny tensors: threads cost more than they give, and one thread matches the reference bit for bit.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference() -> Reference:
    """The official SAM 2 code, runnable in a child process (see tests/reference.py)."""
    try:
        return Reference(ensure_reference())
    except (ReferenceUnavailable, OSError) as exc:
        if REQUIRE_REFERENCE:
            pytest.fail(f"reference SAM 2 code unavailable and SAM2_REQUIRE_REFERENCE is set: {exc}")
        pytest.skip(f"reference SAM 2 code unavailable: {exc}")
