"""The CLI's --model for any decoder-only type: the shape is read from the folder's
config, a type SplitModel refuses is one line saying why, before loading."""
import pytest

from fisherfast.cli._args import UsageError
from fisherfast.cli._model import ModelShape, model_shape
from fisherfast.split import REFUSED_MODEL_TYPES
from tiny_models import tiny_causal_lm


def test_a_new_type_folder_is_read_and_its_layers_checked(tmp_path):
    tiny_causal_lm("qwen3", layers=2).save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    assert shape == ModelShape("qwen3", layers=2, d=32, V=61)
    shape.check_layers([0, 2])
    with pytest.raises(UsageError, match=r"--layer 3: this model has layers 0\.\.2"):
        shape.check_layers([3])


@pytest.mark.parametrize("model_type", sorted(REFUSED_MODEL_TYPES))
def test_a_refused_type_is_one_line_naming_why(model_type):
    with pytest.raises(UsageError) as err:
        ModelShape(model_type, 2, 32, 61).check_layers([1])
    message = str(err.value)
    assert "\n" not in message and f"architecture {model_type!r} cannot be split at a layer" in message
    assert REFUSED_MODEL_TYPES[model_type] in message
