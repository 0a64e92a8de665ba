"""The published package's half of `test_published_packages.py`.

Run in a subprocess as `python published_side.py SITE WORKDIR`, where SITE holds an
unpacked published soma-models wheel. It puts SITE first on `sys.path`, checks that
`soma_models` really comes from there, and then uses only the published public API:
it saves its own weights, loads ours, encodes both, and evaluates SIGReg, RoPE and the
tokenizer on the inputs we wrote, leaving every result in WORKDIR/theirs.npz.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

site, work = sys.argv[1], Path(sys.argv[2])
sys.path.insert(0, site)

import numpy as np  # noqa: E402
import soma_models  # noqa: E402

if not Path(soma_models.__file__).resolve().is_relative_to(Path(site).resolve()):
    raise SystemExit(f"soma_models was imported from {soma_models.__file__}, not from {site}")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from soma_models.v1 import tokenizer  # noqa: E402
from soma_models.v1.flax import Model as FlaxModel  # noqa: E402
from soma_models.v1.flax import SIGReg as FlaxSIGReg  # noqa: E402
from soma_models.v1.torch import Model, ModelConfig, SIGReg, SIGRegConfig  # noqa: E402
from soma_models.v1.torch.modules.attention import apply_rope  # noqa: E402

spec = json.loads((work / "spec.json").read_text())
inputs = np.load(work / "inputs.npz")
config = ModelConfig(0.0, **spec["config"])          # dropout_rate is positional there
tokens, positions = inputs["token_ids"], inputs["pos_ids"]
out: dict[str, np.ndarray] = {}

# torch: save ours-to-be-loaded-by-us, load the file we saved.
torch.manual_seed(spec["seed"])
theirs = Model(config).eval()
theirs.save(work / "torch_theirs.safetensors")
ours = Model.load(work / "torch_ours.safetensors", config).eval()
ours.save(work / "torch_ours_resaved.safetensors")
with torch.no_grad():
    t_tokens, t_positions = torch.from_numpy(tokens), torch.from_numpy(positions)
    out["torch_theirs_encode"] = theirs.encode(t_tokens, t_positions).numpy()
    out["torch_ours_encode"] = ours.encode(t_tokens, t_positions).numpy()
    sig_reg = SIGReg(SIGRegConfig(**spec["sig_reg"]))
    out["torch_sig_reg"] = sig_reg.compute(torch.from_numpy(inputs["x"]),
                                           torch.from_numpy(inputs["noise"])).numpy()
    out["torch_rope"] = apply_rope(torch.from_numpy(inputs["rope_x"]), t_positions,
                                   spec["head_dim"]).numpy()

# Flax: the same, with rngs positional as the published quickstart passes them.
f_theirs = FlaxModel(config, nnx.Rngs(spec["seed"]))
f_theirs.save(work / "flax_theirs.safetensors")
f_ours = FlaxModel.load(work / "flax_ours.safetensors", config, nnx.Rngs(0))
f_ours.save(work / "flax_ours_resaved.safetensors")
j_tokens, j_positions = jnp.asarray(tokens), jnp.asarray(positions)
out["flax_theirs_encode"] = np.asarray(f_theirs.encode(j_tokens, j_positions))
out["flax_ours_encode"] = np.asarray(f_ours.encode(j_tokens, j_positions))
f_sig_reg = FlaxSIGReg(SIGRegConfig(**spec["sig_reg"]), nnx.Rngs(0))
out["flax_sig_reg"] = np.asarray(f_sig_reg.compute(jnp.asarray(inputs["x"]),
                                                   jnp.asarray(inputs["noise"])))

# The tokenizer, in whichever form this version has.
data = bytes(inputs["data"])
if hasattr(tokenizer, "TokenizedSequence"):                       # 0.1.7: one row per item
    rows = tokenizer.tokenize(data, max_seq_len=spec["max_seq_len"])
    out["tokenize"] = np.array([[r.token_ids, r.targets, r.pos_ids] for r in rows])
else:                                                             # 0.1.1: batches of rows
    batches = tokenizer.tokenize(data, max_seq_len=spec["max_seq_len"],
                                 batch_size=spec["batch_size"])
    out["tokenize"] = np.array([row for b in batches
                                for row in zip(b.token_ids, b.targets, b.pos_ids)])
    out["batch_rows"] = np.array([len(b.token_ids) for b in batches])
out["tokenize_empty"] = np.array(len(tokenizer.tokenize(b"")))

np.savez(work / "theirs.npz", **out)
