"""One check of the `weights` argument, used by score, compete, screen, validate, publish."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from soma_models.v1.configs import ModelConfig
from soma_models.v1.registration import publish
from soma_models.v1.scoring import compete, score
from soma_models.v1.screening import screen
from soma_models.v1.sources import check_weights, kind_of
from soma_models.v1.torch import Model
from soma_models.v1.validation import validate

EVERY_FORM = ("a path, bytes-like data, a dict of canonical arrays or a loaded torch or "
              "Flax Model")


def test_each_accepted_form_is_recognised(tmp_path: Path) -> None:
    model = Model(ModelConfig(embedding_dim=8, num_heads=2, pwff_hidden_dim=8, num_layers=1))
    assert kind_of(str(tmp_path)) == kind_of(tmp_path) == "path"
    for data in (b"x", bytearray(b"x"), memoryview(b"x"), np.zeros(3, np.uint8)):
        assert kind_of(data) == "bytes"
    assert kind_of({"embedding.weight": np.zeros((2, 2))}) == "arrays"
    assert kind_of(model) == "model"
    assert check_weights(model) == "model" and check_weights(b"x", ("bytes",)) == "bytes"
    for other in (5, None, 1.5, ["a.safetensors"], object()):
        assert kind_of(other) is None


@pytest.mark.parametrize(("given", "shown"), [
    (5, "got int 5"), (None, "got None"), (["w.safetensors"], "got list ['w.safetensors']")])
def test_the_message_is_one_line_naming_weights_and_what_was_given(given, shown) -> None:
    with pytest.raises(TypeError) as info:
        check_weights(given)
    assert str(info.value) == f"weights must be {EVERY_FORM}, {shown}"


def test_a_long_value_is_shortened_to_one_line() -> None:
    with pytest.raises(TypeError) as info:
        check_weights(list(range(100)))
    message = str(info.value)
    assert "\n" not in message and message.endswith("...") and len(message) < 200


@pytest.mark.parametrize("bad", [5, None])
def test_every_entry_point_refuses_the_wrong_type_in_one_line(bad, tmp_path: Path) -> None:
    data = b"some data"
    calls = {
        "score": (lambda: score(bad, data, 0), EVERY_FORM),
        "compete": (lambda: compete([bad], data, 0), EVERY_FORM),
        "screen": (lambda: screen([bad], [("s", data)], np.ones((1, 8))), EVERY_FORM),
        "validate": (lambda: validate(bad), "a path or bytes-like data"),
        "publish": (lambda: publish(bad, data, tmp_path / "out"), "a path"),
    }
    given = "None" if bad is None else "int 5"
    for name, (call, wanted) in calls.items():
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value) == f"weights must be {wanted}, got {given}", name
    assert not (tmp_path / "out").exists()


def test_publish_and_validate_name_the_forms_they_take() -> None:
    with pytest.raises(TypeError, match=r"^weights must be a path, got bytes b'\\x00'$"):
        publish(b"\x00", b"data", "unused")
    with pytest.raises(TypeError, match=r"^weights must be a path or bytes-like data, got dict"):
        validate({"embedding.weight": np.zeros((2, 2))})
