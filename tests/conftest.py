"""Fixtures and settings of the test session: the seeded RNG, the thread-count guard and the
hypothesis profile. What tests share beyond fixtures (the float64 reference, tolerances, array
libraries, layouts) is the module helpers.py, imported as `from helpers import ...`."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

try:
    from hypothesis import HealthCheck, settings

    # Derandomized so that CI runs are reproducible; BATCHNORM_HYPOTHESIS_EXAMPLES scales it.
    settings.register_profile(
        "batchnorm",
        max_examples=int(os.environ.get("BATCHNORM_HYPOTHESIS_EXAMPLES", "150")),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile("batchnorm")
except ImportError:  # pragma: no cover
    pass

# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: stable across runs, distinct across tests."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def restore_threads():
    import batchnorm as bn

    before = bn.get_num_threads()
    yield before
    bn.set_num_threads(before)
