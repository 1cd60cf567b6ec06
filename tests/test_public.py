"""The public face: top-level names, their import cost, and the old names that warn."""
import subprocess
import sys
import warnings

import pytest

import fisherfast


def test_import_fisherfast_imports_neither_transformers_nor_the_method_packages():
    code = ("import sys, fisherfast; "
            "print(sorted(m for m in ('transformers', 'fisherfast.split', 'fisherfast.steer', 'fisherfast.sketch', "
            "'fisherfast.metric') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_top_level_names_are_the_subpackages_objects():
    import importlib

    for name, home in fisherfast._HOMES.items():
        assert getattr(fisherfast, name) is getattr(importlib.import_module(home), name), name
        assert name in fisherfast.__all__ and name in dir(fisherfast)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fisherfast.nope  # noqa: B018


@pytest.mark.parametrize("package, old, new_home, new", [
    ("fisherfast.metric", "work_dtype", "fisherfast.checks", "compute_dtype"),
    ("fisherfast.metric", "DEFAULT_K", "fisherfast.metric.pullback", "DEFAULT_K"),
    ("fisherfast.geodesic", "ConceptSchema", "fisherfast.concepts", "ConceptSchema"),
    ("fisherfast.geodesic", "WEEKDAYS", "fisherfast.geodesic.tasks", "WEEKDAYS"),
    ("fisherfast.geodesic", "DEFAULT_EPS_FRACTION", "fisherfast.geodesic.metrics", "DEFAULT_EPS_FRACTION"),
    ("fisherfast.steer", "model_identity", "fisherfast.steer.vectors", "model_identity"),
    ("fisherfast.sketch", "init_distributed_from_env", "fisherfast.sketch.corpus", "init_distributed_from_env"),
    ("fisherfast.sketch", "KINDS", "fisherfast.sketch.state", "KINDS"),
])
def test_old_names_warn_and_still_work(package, old, new_home, new):
    import importlib

    module = importlib.import_module(package)
    with pytest.warns(DeprecationWarning, match=f"{package}.{old} is deprecated"):
        value = getattr(module, old)
    assert value is getattr(importlib.import_module(new_home), new)
    assert old not in module.__all__


def test_current_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from fisherfast.checks import compute_dtype  # noqa: F401
        import fisherfast.geodesic
        import fisherfast.metric
        import fisherfast.sketch
        import fisherfast.steer

        for package in (fisherfast.geodesic, fisherfast.metric, fisherfast.sketch, fisherfast.steer):
            for name in package.__all__:
                getattr(package, name)
