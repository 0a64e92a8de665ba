"""The torch training step (`v1/torch/train_step.py`): gradients equal a materialised
step's (direct attention and SIGReg formulas), the update, the bf16 policy and the
optimizer groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.v1.torch.modules.test_attention_kernels import RTOL, SMALL, assert_close, model_pair
from tests.v1.torch.modules.test_sig_reg import direct_sig_reg

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.torch.modules import attention
from soma_models.v1.torch.modules.model import Model

# --- training step ------------------------------------------------------------------


def reference_step_gradients(model: Model, tokens: torch.Tensor, targets: torch.Tensor,
                             noise: torch.Tensor, config: SIGRegConfig):
    """Loss and gradients with materialised attention and the direct SIGReg formula."""
    for module in model.modules():
        if isinstance(module, attention.MultiHeadAttention):
            module.fused = False
    model.zero_grad(set_to_none=True)
    reps = model.encode(tokens)
    logits = model.predict(reps)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1), ignore_index=256,
                                           reduction="sum") / targets.numel()
    loss = ce + config.coefficient * direct_sig_reg(reps, noise, config).float()
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_step_gradients_match_a_materialised_step(checkpointing: bool) -> None:
    from soma_models.v1.torch.modules.sig_reg import SIGReg
    from soma_models.v1.torch.train_step import make_optimizer, prepare_model, train_step

    config = SIGRegConfig(slices=64)
    fast, slow = model_pair(SMALL, weight_std=None, dtype=torch.float32)
    generator = torch.Generator().manual_seed(14)
    tokens = torch.randint(0, 258, (2, 96), generator=generator)
    targets = torch.randint(0, 258, (2, 96), generator=generator)
    targets[:, -5:] = 256                                   # PAD targets count in the mean
    noise = torch.randn(SMALL.embedding_dim, config.slices, generator=generator)
    pos_ids = torch.arange(96).expand(2, 96)
    prepare_model(fast, activation_checkpointing=checkpointing)
    optimizer = make_optimizer(fast, lr=0.0)              # lr 0: the step leaves weights as is
    result = train_step(fast, SIGReg(config), optimizer, (tokens, targets, pos_ids), noise=noise)
    expected_loss, expected_grads = reference_step_gradients(slow, tokens, targets, noise, config)
    np.testing.assert_allclose(result.loss, expected_loss, rtol=RTOL)
    np.testing.assert_allclose(result.loss, result.cross_entropy + result.sig_reg, rtol=1e-6)
    for name, param in fast.named_parameters():
        assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-6)


def test_train_step_updates_weights_and_accepts_array_batches() -> None:
    from soma_models.v1.tokenizer import iter_batches
    from soma_models.v1.torch.modules.sig_reg import SIGReg
    from soma_models.v1.torch.train_step import make_optimizer, train_step

    config = ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=1, num_heads=2)
    model = Model(config)
    before = model.predictor.weight.detach().clone()
    batch = next(iter(iter_batches(bytes(range(200)) * 3, max_seq_len=64, batch_size=2)))
    result = train_step(model, SIGReg(SIGRegConfig(slices=16)), make_optimizer(model, lr=1e-2),
                        batch, max_grad_norm=1.0)
    assert result.grad_norm is not None and result.grad_norm > 0.0
    assert math.isfinite(result.loss)
    assert not torch.equal(before, model.predictor.weight)


def test_bf16_autocast_runs_on_cpu_with_float32_loss_terms() -> None:
    # The one bf16 policy (train_step.check_bf16_autocast): CPU autocast is allowed, the
    # loss stays float32 and near the float32 step's.
    from soma_models.v1.torch.modules.sig_reg import SIGReg
    from soma_models.v1.torch.train_step import make_optimizer, train_step

    torch.manual_seed(0)
    model = Model(ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=1, num_heads=2))
    reference = Model(model.config)
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    batch = (tokens, torch.roll(tokens, -1, 1), torch.arange(16).expand(2, 16))
    noise = torch.randn(32, 8)
    sig_reg = SIGReg(SIGRegConfig(slices=8))
    low = train_step(model, sig_reg, make_optimizer(model), batch, noise=noise,
                     autocast_bf16=True)
    full = train_step(reference, sig_reg, make_optimizer(reference), batch, noise=noise)
    assert math.isfinite(low.loss)
    assert low.loss == pytest.approx(full.loss, rel=2e-2)


def test_bf16_autocast_is_refused_on_devices_without_bf16() -> None:
    from soma_models.v1.torch.train_step import check_bf16_autocast

    check_bf16_autocast(torch.device("cpu"))
    with pytest.raises(ValueError, match="bf16 autocast is supported on CUDA and CPU"):
        check_bf16_autocast(torch.device("meta"))


def test_make_optimizer_decays_matrices_only() -> None:
    from soma_models.v1.torch.train_step import make_optimizer

    model = Model(ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=1, num_heads=2))
    optimizer = make_optimizer(model, weight_decay=0.1)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decayed) == (param.ndim >= 2), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    for implementation in ("fused", "foreach", "loop"):
        make_optimizer(model, implementation=implementation)
    with pytest.raises(ValueError, match="auto, fused, foreach or loop"):
        make_optimizer(model, implementation="turbo")


def test_bf16_training_loss_and_gradients_match_float32() -> None:
    # The lean bf16 forward (RoPE tables built once in bf16, the attention input cast
    # once) computes the float32 step's loss to within bf16 rounding: every term within
    # 1% (bf16 keeps 8 significant bits, ~0.4% per rounding), the gradient in the same
    # direction. Weights are spread so that attention, RoPE and every term matter.
    from soma_models.v1.torch.modules.sig_reg import SIGReg
    from soma_models.v1.torch.train_step import backward

    torch.manual_seed(3)
    config = ModelConfig(embedding_dim=64, pwff_hidden_dim=128, num_layers=3, num_heads=4)
    model = Model(config).train()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    tokens = torch.randint(0, 256, (2, 48))
    targets = torch.roll(tokens, -1, 1)
    pos_ids = torch.randint(0, 4096, (2, 48))                 # uneven positions: RoPE matters
    noise = torch.randn(config.embedding_dim, 16)
    sig_reg = SIGReg(SIGRegConfig(slices=16))
    terms, grads = {}, {}
    for bf16 in (False, True):
        model.zero_grad(set_to_none=True)
        step = backward(model, sig_reg, tokens, targets, pos_ids, noise=noise,
                        autocast_bf16=bf16)
        assert step.loss.dtype == torch.float32
        terms[bf16] = {name: float(getattr(step, name).detach())
                       for name in ("loss", "cross_entropy", "sig_reg")}
        grads[bf16] = torch.cat([p.grad.flatten() for p in model.parameters()])
    low, full = terms[True], terms[False]
    for name in ("loss", "cross_entropy", "sig_reg"):
        assert low[name] == pytest.approx(full[name], rel=1e-2), name
    assert low["loss"] != full["loss"]                        # bf16 did run
    cosine = torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
    assert float(cosine) > 0.99


def _compiled_against_eager(backend: str, checkpointing: bool) -> None:
    """A model with compiled blocks computes the eager loss and gradients (float32)."""
    from soma_models.v1.torch.modules.sig_reg import SIGReg
    from soma_models.v1.torch.train_step import backward, prepare_model

    torch.manual_seed(5)
    config = ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=2, num_heads=2)
    eager = Model(config).train()
    compiled = Model(config).train()
    compiled.load_state_dict(eager.state_dict())
    prepare_model(compiled, compile=True, compile_backend=backend,
                  activation_checkpointing=checkpointing)
    tokens = torch.randint(0, 256, (2, 32))
    batch = (tokens, torch.roll(tokens, -1, 1), torch.randint(0, 1000, (2, 32)))
    noise = torch.randn(config.embedding_dim, 8)
    sig_reg = SIGReg(SIGRegConfig(slices=8))
    want = backward(eager, sig_reg, *batch, noise=noise)
    got = backward(compiled, sig_reg, *batch, noise=noise)
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_trace_to_the_eager_step(checkpointing: bool) -> None:
    # aot_eager runs torch.compile's graph capture and autograd tracing (the graph breaks
    # around the exact attention's data-dependent check included) in seconds.
    _compiled_against_eager("aot_eager", checkpointing)


@pytest.mark.slow  # inductor generates and builds C++ kernels: ~25 s on 2 cores, cold cache
def test_inductor_compiled_blocks_match_the_eager_step() -> None:
    _compiled_against_eager("inductor", checkpointing=True)


def test_compile_is_refused_where_it_cannot_work(monkeypatch) -> None:
    from soma_models.v1.torch import train_step

    with pytest.raises(ValueError, match="supported on CUDA and CPU devices, not meta"):
        train_step.check_compile(torch.device("meta"))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(train_step.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"^torch.compile on the CPU needs a C\+\+ compiler"):
        train_step.check_compile(torch.device("cpu"))
    train_step.check_compile(torch.device("cpu"), backend="aot_eager")   # no code generated


def test_compiled_blocks_run_eagerly_when_evaluating() -> None:
    # Scoring and held-out evaluation of a model prepared with compile=True never run
    # generated code: the compiler is asked for graphs only by the training forward.
    from soma_models.v1.torch.modules.sig_reg import SIGReg
    from soma_models.v1.torch.train_step import backward, prepare_model

    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch.manual_seed(6)
    config = ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=2, num_heads=2)
    model = Model(config)
    eager = Model(config)
    eager.load_state_dict(model.state_dict())
    prepare_model(model, compile=True, compile_backend=counting_backend)
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), eager.eval()(tokens))
    assert graphs == []
    backward(model.train(), SIGReg(SIGRegConfig(slices=8)), tokens, torch.roll(tokens, -1, 1),
             torch.arange(24).expand(2, 24), noise=torch.randn(32, 8))
    assert graphs
