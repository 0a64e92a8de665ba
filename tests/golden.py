"""Load the Rust runtime's golden cases and rebuild their inputs with soma-arrgen."""

from __future__ import annotations

import json
import os
from pathlib import Path

import arrgen
import numpy as np

GOLDEN_PATH = Path(
    os.environ.get(
        "SOMA_GOLDEN",
        Path(__file__).resolve().parents[1] / "tests" / "data" / "v1_rust_golden.json",
    )
)


def load_golden() -> dict:
    with open(GOLDEN_PATH) as fh:
        return json.load(fh)


def cases(component: str | None = None) -> list[dict]:
    all_cases = load_golden()["cases"]
    return [c for c in all_cases if component is None or c["component"] == component]


def tolerance() -> tuple[float, float]:
    tol = load_golden()["tolerance"]
    return float(tol["rtol"]), float(tol["atol"])


def build(spec: object) -> np.ndarray:
    """Rebuild one array from its generator spec, or take a literal list as is."""
    if isinstance(spec, list):
        return np.asarray(spec)
    assert isinstance(spec, dict), spec
    shape = list(spec["shape"])
    if spec["gen"] == "normal":
        arr = arrgen.normal_array(spec["seed"], shape, spec["mean"], spec["std"])
    elif spec["gen"] == "uniform":
        arr = arrgen.uniform_array(spec["seed"], shape, spec["min"], spec["max"])
    elif spec["gen"] == "constant":
        arr = arrgen.constant_array(shape, spec["value"])
    else:
        raise ValueError(f"unknown generator {spec['gen']!r}")
    return np.asarray(arr, dtype=np.float32).reshape(shape)


def params(case: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """The case's weights as canonical arrays, with `prefix` stripped from the keys."""
    out = {}
    for key, spec in case["params"].items():
        out[key[len(prefix):] if prefix and key.startswith(prefix) else key] = build(spec)
    return out


def expected(case: dict) -> np.ndarray:
    exp = case["expected"]
    arr = np.asarray(exp["values"], dtype=np.float32)
    return arr.reshape(exp["shape"])


def case_id(case: dict) -> str:
    return case["name"].replace(".rs::", "::")


# SPEC §9: a faithful float32 implementation lands within ~3e-6 of every golden value;
# chains of layers get 1e-4.
TIGHT_RTOL = {"encoder": 1e-4, "model_encode": 1e-4, "model_predict": 1e-4}


def assert_matches_golden(case: dict, got: np.ndarray) -> None:
    """`got` within the golden file's own tolerance and within the tight SPEC §9 bound."""
    want = expected(case)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    rtol, atol = tolerance()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(got, want, rtol=TIGHT_RTOL.get(case["component"], 1e-5), atol=1e-5)
    deviation = np.abs(got.astype(np.float64) - want)
    relative = deviation / np.maximum(np.abs(want), 1e-30)
    print(f"{case_id(case)}: max |diff| {deviation.max():.3g}, max rel {relative.max():.3g}")
