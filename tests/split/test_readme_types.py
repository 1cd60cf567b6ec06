"""The README's split section lists the verified and the refused model types
from the code (``SUPPORTED_MODEL_TYPES``, ``REFUSED_MODEL_TYPES``), not by hand."""
import pathlib
import re

from fisherfast.split import REFUSED_MODEL_TYPES, SUPPORTED_MODEL_TYPES

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def between(name):
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.DOTALL)
    assert match, f"README.md lacks the {name} markers"
    return match.group(1)


def test_readme_lists_the_supported_types():
    listed = re.findall(r"`([a-z0-9_]+)`", between("supported-model-types"))
    assert listed == sorted(SUPPORTED_MODEL_TYPES), (
        "regenerate: ', '.join(f'`{t}`' for t in sorted(fisherfast.split.SUPPORTED_MODEL_TYPES))")


def test_readme_lists_the_refused_types_with_their_reasons():
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| (.*) \|$", between("refused-model-types"), re.MULTILINE)
    assert dict(rows) == REFUSED_MODEL_TYPES and [t for t, _ in rows] == sorted(REFUSED_MODEL_TYPES)
