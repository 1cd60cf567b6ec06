"""tests/cli is a package, so its conftest.py does not take the module name
`conftest` that other test files import shared helpers from (tests/conftest.py:
TINY_ARCHS, tiny_causal_lm). Without tests/cli/__init__.py, collecting
tests/cli before tests/steer made `from conftest import TINY_ARCHS` fail."""
from __future__ import annotations

import pathlib


def test_conftest_module_is_the_shared_one():
    import conftest

    tests = pathlib.Path(__file__).resolve().parents[1]
    assert pathlib.Path(conftest.__file__).resolve() == tests / "conftest.py"
    assert hasattr(conftest, "TINY_ARCHS") and hasattr(conftest, "tiny_causal_lm")
