"""The Flax data-parallel step over a 2-device mesh matches the same step on 1 device.

Runs in a subprocess: the 2 host CPU devices exist only if XLA_FLAGS is set before JAX
starts, and this test process may already have started JAX.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from flax import nnx
    from soma_models.train.flax_sharding import ShardedTrainStep, data_mesh
    from soma_models.train.data import ChunkTable, Document
    from soma_models.v1.configs import ModelConfig, SIGRegConfig
    from soma_models.v1.flax.modules.model import Model

    assert len(jax.devices()) == 2, jax.devices()
    config = ModelConfig(embedding_dim=32, num_layers=1, num_heads=2, pwff_hidden_dim=64)
    sig = SIGRegConfig(slices=32, points=5)  # fewer quadrature points: faster to compile
    text = b"".join(b"row %d of the flax sharding test, some bytes to learn.\\n" % i
                    for i in range(40))
    table = ChunkTable([Document("t", text)], 32)
    rng = np.random.default_rng(0)

    def run(devices):
        step = ShardedTrainStep(Model(config, rngs=nnx.Rngs(0)), data_mesh(devices), lr=3e-3,
                                warmup_steps=1, total_steps=4, sig_reg_config=sig)
        losses = []
        for k in range(4):
            batch = table.rows(np.arange(4 * k, 4 * k + 4) % len(table))
            noise = np.random.default_rng(k).standard_normal((32, 32)).astype(np.float32)
            losses.append(step(batch.token_ids, batch.targets, batch.pos_ids, noise))
        return losses, jax.device_get(step.params)

    one_losses, one = run(jax.devices()[:1])
    two_losses, two = run(jax.devices()[:2])
    diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), one, two))
    print(json.dumps({"max_param_diff": max(diffs), "one": one_losses, "two": two_losses}))
""")


def test_two_device_mesh_matches_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["one"] == pytest.approx(result["two"], rel=1e-5, abs=1e-5)
    assert result["one"][-1] < result["one"][0]          # it trains
    assert result["max_param_diff"] < 1e-5
