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


# --- jax.distributed from the environment ------------------------------------------


def test_single_process_environments_join_nothing():
    from soma_models.train.flax_sharding import distributed_settings

    assert distributed_settings({}) is None
    assert distributed_settings({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert distributed_settings({"SLURM_NTASKS": "1"}) is None


def test_jax_names_come_before_torchrun_names():
    from soma_models.train.flax_sharding import distributed_settings

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3", "MASTER_ADDR": "other", "WORLD_SIZE": "2", "RANK": "0"}
    assert distributed_settings(env) == {"coordinator_address": "10.0.0.1:1234",
                                         "num_processes": 4, "process_id": 3}


def test_torchrun_environment():
    from soma_models.train.flax_sharding import distributed_settings

    env = {"MASTER_ADDR": "node0", "MASTER_PORT": "4000", "WORLD_SIZE": "2", "RANK": "1"}
    # torchrun's store holds MASTER_PORT; JAX's coordinator listens on the next port.
    assert distributed_settings(env) == {"coordinator_address": "node0:4001",
                                         "num_processes": 2, "process_id": 1}
    del env["MASTER_PORT"]
    assert distributed_settings(env)["coordinator_address"] == "node0:29501"


def test_launchers_jax_detects_itself():
    from soma_models.train.flax_sharding import distributed_settings

    assert distributed_settings({"SLURM_NTASKS": "8"}) == {}
    assert distributed_settings({"OMPI_COMM_WORLD_SIZE": "2"}) == {}


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': expected an integer >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "neither JAX_COORDINATOR_ADDRESS nor MASTER_ADDR"),
    ({"MASTER_ADDR": "h", "RANK": "0"}, "neither JAX_NUM_PROCESSES nor WORLD_SIZE"),
    ({"MASTER_ADDR": "h", "WORLD_SIZE": "2"}, "neither JAX_PROCESS_ID nor RANK"),
    ({"MASTER_ADDR": "h", "WORLD_SIZE": "2", "RANK": "2"}, "RANK=2: expected an index below"),
    ({"MASTER_ADDR": "h", "WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1': expected an integer"),
    ({"MASTER_ADDR": "h", "MASTER_PORT": "x", "WORLD_SIZE": "2", "RANK": "0"},
     "MASTER_PORT='x': expected an integer >= 1"),
])
def test_bad_environments_are_one_line_errors(env, message):
    from soma_models.train.flax_sharding import distributed_settings

    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as caught:
        distributed_settings(env)
    assert "\n" not in str(caught.value)


def test_initialize_from_env_single_process_does_nothing():
    from soma_models.train.flax_sharding import initialize_from_env

    assert initialize_from_env({}) is False


WORKER = textwrap.dedent("""
    import json
    import jax, numpy as np
    from flax import nnx
    from soma_models.train.flax_sharding import ShardedTrainStep, data_mesh, initialize_from_env
    from soma_models.v1.configs import ModelConfig, SIGRegConfig
    from soma_models.v1.flax.modules.model import Model

    several = initialize_from_env()
    config = ModelConfig(embedding_dim=32, num_layers=1, num_heads=2, pwff_hidden_dim=64)
    tokens = np.random.default_rng(0).integers(0, 256, (3, 4, 33)).astype(np.int32)
    step = ShardedTrainStep(Model(config, rngs=nnx.Rngs(0)), data_mesh(), lr=3e-3,
                            warmup_steps=1, total_steps=3,
                            sig_reg_config=SIGRegConfig(slices=16, points=5))
    rank, processes = jax.process_index(), jax.process_count()
    losses = []
    for k in range(3):
        rows = tokens[k][rank * 4 // processes:(rank + 1) * 4 // processes]  # its own rows
        noise = np.random.default_rng(k).standard_normal((32, 16)).astype(np.float32)
        losses.append(step(rows[:, :-1], rows[:, 1:],
                           np.broadcast_to(np.arange(32), (len(rows), 32)), noise))
    print(json.dumps({"several": several, "devices": len(jax.devices()), "losses": losses}))
""")


@pytest.mark.slow
def test_two_processes_from_the_environment_match_one_process():
    """jax.distributed.initialize from JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/
    JAX_PROCESS_ID: two CPU processes, each passing its half of every batch, train as one
    process on the whole batch does (float32 rounding)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    base["JAX_PLATFORMS"] = "cpu"
    workers = [subprocess.Popen(
        [sys.executable, "-c", WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(rank)}) for rank in (0, 1)]
    single = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True,
                            env=base, timeout=300)
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads(single.stdout.strip().splitlines()[-1])
    assert not one["several"] and one["devices"] == 1
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
        two = json.loads(out.strip().splitlines()[-1])
        assert two["several"] and two["devices"] == 2
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
