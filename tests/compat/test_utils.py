"""soma_models.utils: flatten_dict, unflatten_dict, remap (the published helpers)."""

from __future__ import annotations

import numpy as np
import pytest

from soma_models.utils import flatten_dict, remap, unflatten_dict
from soma_models.utils.dict import flatten_dict as flatten_from_module
from soma_models.utils.remap import remap as remap_from_module
from soma_models.v1.flax import serde as flax_serde
from soma_models.v1.torch import serde as torch_serde


def test_submodules_and_serde_re_exports_are_the_same_functions() -> None:
    assert flatten_from_module is flatten_dict and remap_from_module is remap
    assert torch_serde.remap is remap and flax_serde.remap is remap
    assert flax_serde.flatten_dict is flatten_dict and flax_serde.unflatten_dict is unflatten_dict


def test_flatten_and_unflatten_are_inverse() -> None:
    nested = {"encoder": {"layers": {"0": {"norm_1": {"gamma": 1, "beta": 2}}}}, "top": 3}
    flat = flatten_dict(nested)
    assert flat == {"encoder.layers.0.norm_1.gamma": 1, "encoder.layers.0.norm_1.beta": 2,
                    "top": 3}
    assert unflatten_dict(flat) == nested
    assert flatten_dict({"a": {"b": 1}}, parent_key="p", sep="/") == {"p/a/b": 1}
    assert unflatten_dict({"a/b": 1}, sep="/") == {"a": {"b": 1}}


def test_flatten_keeps_non_dict_leaves_and_empty_dicts() -> None:
    leaf = np.zeros(2)
    flat = flatten_dict({"a": {"w": leaf}, "e": {}, "l": [1, {"x": 1}]})
    assert flat["a.w"] is leaf and flat["e"] == {} and flat["l"] == [1, {"x": 1}]


def test_unflatten_refuses_a_key_that_is_both_value_and_prefix() -> None:
    # The message starts with the published package's words (people's tests match on
    # them) and names the conflicting key, whichever order the keys come in.
    for flat in ({"a": 1, "a.b": 2}, {"a.b": 2, "a": 1}, {"x.a": 1, "x.a.b.c": 2}):
        with pytest.raises(ValueError) as caught:
            unflatten_dict(flat)
        message = str(caught.value)
        assert message.startswith("Unflattening conflict"), message
        assert "'a'" in message or "'x.a'" in message, message
        assert "\n" not in message


def test_remap_renames_and_deletes_in_place() -> None:
    d = {"attention.out.kernel": 1, "norm.scale": 2, "drop": 3}
    assert remap(d, {"attention.out.kernel": "attention.output.weight",
                     "norm.scale": "norm.gamma", "absent": "x"}, ["drop", "also_absent"]) is None
    assert d == {"attention.output.weight": 1, "norm.gamma": 2}


def test_remap_applies_renames_in_order() -> None:
    d = {"a": 1, "b": 2}
    remap(d, {"a": "b"}, [])
    assert d == {"b": 1}
    d = {"a": 1}
    remap(d, {"a": "b", "b": "c"}, [])
    assert d == {"c": 1}
