"""`shotcache serve` starts OpenBLAS with a short spin (app/__init__.py): the variable must be set before numpy
first loads, which only an import-order check in a fresh interpreter can show."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Records OPENBLAS_THREAD_TIMEOUT at the moment numpy is first imported, then imports the CLI's module.
PROBE = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not seen:
            seen.append(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
        return None
sys.meta_path.insert(0, Spy())
import api.cli
print(seen[0] if seen else "numpy not imported")
"""


@pytest.mark.parametrize(("given", "expected"), [(None, "20"), ("6", "6")])
def test_numpy_loads_with_the_short_blas_spin_unless_one_is_given(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == expected
