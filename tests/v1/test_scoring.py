"""score / compete against an independent NumPy computation of SPEC §6-§7."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from tests.v1 import numpy_reference as ref

from soma_models.v1 import batch_order
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.schema import param_specs
from soma_models.v1.scoring import (
    Competition,
    NaNLossWarning,
    Score,
    commitment,
    compete,
    cosine_distance,
    decrypt_weights,
    encrypt_weights,
    pick_winner,
    score,
    validate,
)
from soma_models.v1.transit import parse_key

RTOL, ATOL = 1e-5, 1e-5
SLICES = 48
SIG_REG = SIGRegConfig(slices=SLICES)

SMALL = ModelConfig(embedding_dim=16, num_heads=2, num_layers=1, pwff_hidden_dim=32)
DEEPER = ModelConfig(embedding_dim=32, num_heads=4, num_layers=2, pwff_hidden_dim=48)


def random_weights(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Canonical arrays with enough spread that every term of the loss matters."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in param_specs(config):
        if spec.kind == "norm_gamma":
            value = 1.0 + 0.2 * rng.standard_normal(spec.shape)
        elif spec.kind in ("norm_beta", "linear_bias"):
            value = 0.1 * rng.standard_normal(spec.shape)
        else:
            value = rng.standard_normal(spec.shape) / np.sqrt(spec.shape[0]) * 1.5
        out[spec.key] = value.astype(np.float32)
    return out


def sizes_of(config: ModelConfig) -> ref.Sizes:
    return ref.Sizes(config.embedding_dim, config.num_heads, config.num_layers,
                     config.pwff_hidden_dim)


def data_of(length: int, seed: int = 0) -> bytes:
    # Text-like bytes (a skewed distribution), so cross-entropy varies between batches.
    rng = np.random.default_rng(seed)
    return bytes(rng.choice(np.frombuffer(b"soma scores bytes on chain. ", np.uint8), length))


def assert_matches_reference(weights, config, data, seed, seq_len, batch_size, **kwargs):
    got = score(weights, data, seed, model_config=config, sig_reg_config=SIG_REG,
                max_seq_len=seq_len, batch_size=batch_size, **kwargs)
    loss, embedding = ref.reference_score(weights, data, seed, sizes_of(config), seq_len,
                                          batch_size, slices=SLICES)
    np.testing.assert_allclose(got.loss, loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.embedding, embedding, rtol=RTOL, atol=ATOL)
    assert got.embedding.dtype == np.float32 and got.embedding.shape == (config.embedding_dim,)
    return got


# Lengths at seq_len 16, batch_size 4: inside one chunk, exactly one chunk (no EOS),
# an exact multiple of a batch, and several batches with a partial last chunk and batch.
@pytest.mark.parametrize("length", [5, 16, 64, 16 * 4 * 3 + 7])
@pytest.mark.parametrize("config", [SMALL, DEEPER], ids=["small", "deeper"])
def test_score_matches_numpy_reference(config, length):
    weights = random_weights(config, seed=length)
    got = assert_matches_reference(weights, config, data_of(length), 2**64 - 100, 16, 4)
    assert got.batch_losses.shape == (-(-length // 64),)


def test_score_far_positions():
    """70 000 bytes: positions go far past 2**16; the RoPE angle rounding must match.

    A coarse SIGReg (8 slices, 5 points) keeps the 70 000-position run quick."""
    weights = random_weights(SMALL, seed=3)
    data = data_of(70_000, seed=1)
    coarse = SIGRegConfig(slices=8, points=5)
    got = score(weights, data, 11, model_config=SMALL, sig_reg_config=coarse, max_seq_len=128,
                batch_size=128)
    loss, embedding = ref.reference_score(weights, data, 11, sizes_of(SMALL), 128, 128,
                                          slices=8, points=5)
    np.testing.assert_allclose(got.loss, loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.embedding, embedding, rtol=RTOL, atol=ATOL)
    assert got.batch_losses.shape == (5,)


def test_cross_entropy_denominator_counts_pad_targets():
    """The chain divides by every position; an ignore_index mean gives another number."""
    weights = random_weights(SMALL, seed=5)
    data = data_of(9)  # 9 data bytes in a 32-position chunk: most targets are PAD
    got = score(weights, data, 1, model_config=SMALL, sig_reg_config=SIG_REG, max_seq_len=32,
                batch_size=2)
    common = {"slices": SLICES}
    right, _ = ref.reference_score(weights, data, 1, sizes_of(SMALL), 32, 2, **common)
    wrong, _ = ref.reference_score(weights, data, 1, sizes_of(SMALL), 32, 2,
                                   denominator="non_pad", **common)
    np.testing.assert_allclose(got.loss, right, rtol=RTOL)
    assert abs(wrong - right) > 1000 * RTOL * abs(right)
    assert abs(got.loss - wrong) > 1000 * RTOL * abs(wrong)


def test_batches_weigh_the_same_whatever_their_size():
    """Running mean over batches: a 1-row last batch counts as much as a 4-row one."""
    weights = random_weights(SMALL, seed=6)
    data = data_of(16 * 4 + 3, seed=2)  # batch 0: 4 rows, batch 1: 1 short row
    got = score(weights, data, 4, model_config=SMALL, sig_reg_config=SIG_REG, max_seq_len=16,
                batch_size=4)
    common = {"slices": SLICES}
    right = ref.reference_score(weights, data, 4, sizes_of(SMALL), 16, 4, **common)
    wrong = ref.reference_score(weights, data, 4, sizes_of(SMALL), 16, 4,
                                weighting="position", **common)
    np.testing.assert_allclose(got.loss, right[0], rtol=RTOL)
    np.testing.assert_allclose(got.embedding, right[1], rtol=RTOL, atol=ATOL)
    assert abs(wrong[0] - right[0]) > 1000 * RTOL * abs(right[0])
    assert np.abs(wrong[1] - right[1]).max() > 1000 * ATOL
    # The running mean of the per-batch losses is the score.
    np.testing.assert_allclose(got.loss, got.batch_losses.mean(), rtol=1e-6)


@pytest.mark.parametrize("micro", [1, 3, "auto"])
def test_micro_batches_do_not_change_the_result(micro):
    weights = random_weights(SMALL, seed=7)
    data = data_of(16 * 4 * 2 + 9)
    whole = score(weights, data, 8, sig_reg_config=SIG_REG, max_seq_len=16, batch_size=4)
    split = score(weights, data, 8, sig_reg_config=SIG_REG, max_seq_len=16, batch_size=4,
                  micro_batch_size=micro)
    np.testing.assert_allclose(split.loss, whole.loss, rtol=1e-6)
    np.testing.assert_allclose(split.embedding, whole.embedding, rtol=1e-6, atol=1e-7)


def test_auto_micro_batches_are_sized_for_the_device():
    from soma_models.v1.configs import PRESETS
    from soma_models.v1.scoring import (
        AUTO_PIECE_BYTES,
        AUTO_PIECE_BYTES_CPU,
        AUTO_ROWS_CPU,
        auto_micro_batch_size,
    )

    low, high = AUTO_ROWS_CPU
    for name, config in PRESETS.items():
        per_row = 1024 * 4 * (config.pwff_hidden_dim + 6 * config.embedding_dim
                              + config.vocab_size)
        accelerator = auto_micro_batch_size(config, 1024)
        cpu = auto_micro_batch_size(config, 1024, on_cpu=True)
        assert accelerator == max(1, AUTO_PIECE_BYTES // per_row), name
        assert low <= cpu <= high, name
        # Inside the clamp, a CPU piece stays within its cache-sized budget.
        assert cpu == low or cpu * per_row <= AUTO_PIECE_BYTES_CPU, name
    # The full-width V1 (85 MB of activations per row) gets the CPU minimum of 2 rows and
    # about 25 rows on an accelerator; an explicit budget wins over both.
    v1 = PRESETS["v1"]
    assert auto_micro_batch_size(v1, 1024, on_cpu=True) == low
    assert auto_micro_batch_size(v1, 1024) == 25
    assert auto_micro_batch_size(v1, 1024, 1, on_cpu=True) == 1


def test_weights_given_every_way_score_the_same(tmp_path):
    import torch

    from soma_models.v1.torch.modules.model import Model

    weights = random_weights(SMALL, seed=8)
    data = data_of(40)
    kwargs = {"sig_reg_config": SIG_REG, "max_seq_len": 16, "batch_size": 2}
    expected = score(weights, data, 9, model_config=SMALL, **kwargs)
    model = Model.load_bytes(_bytes_of(weights, SMALL))
    path = tmp_path / "w.safetensors"
    model.save(path)
    encrypted, key = encrypt_weights(path.read_bytes())
    enc_path = tmp_path / "w.enc"
    enc_path.write_bytes(encrypted)
    assert decrypt_weights(encrypted, key) == path.read_bytes()
    model.train()
    for source, key_arg in [(path, None), (str(path), None), (path.read_bytes(), None),
                            (model, None), (enc_path, key), (encrypted, parse_key(key))]:
        got = score(source, data, 9, key=key_arg, **kwargs)
        assert got.loss == expected.loss
        np.testing.assert_array_equal(got.embedding, expected.embedding)
    assert model.training, "scoring must leave the model's mode as it was"
    assert torch.is_grad_enabled()


def _bytes_of(weights, config) -> bytes:
    from soma_models.safetensors_io import to_bytes
    from soma_models.v1.schema import file_metadata

    return to_bytes(weights, file_metadata(config))


def test_dropout_is_off_when_scoring():
    from soma_models.v1.torch.modules.model import Model

    weights = random_weights(SMALL, seed=9)
    model = Model.load_bytes(_bytes_of(weights, SMALL),
                             ModelConfig(**{**SMALL.to_dict(), "dropout_rate": 0.5}))
    model.train()
    data = data_of(30)
    kwargs = {"sig_reg_config": SIG_REG, "max_seq_len": 16, "batch_size": 2}
    assert score(model, data, 1, **kwargs).loss == score(weights, data, 1, model_config=SMALL,
                                                          **kwargs).loss


def test_inferred_config_equals_explicit():
    weights = random_weights(DEEPER, seed=10)
    data = data_of(20)
    kwargs = {"sig_reg_config": SIG_REG, "max_seq_len": 16, "batch_size": 2}
    inferred = score(_bytes_of(weights, DEEPER), data, 2, **kwargs)
    explicit = score(weights, data, 2, model_config=DEEPER, **kwargs)
    assert inferred.loss == explicit.loss


def test_bad_inputs_are_refused_clearly():
    weights = random_weights(SMALL, seed=11)
    with pytest.raises(ValueError, match="empty"):
        score(weights, b"", 1)
    with pytest.raises(ValueError, match="u64"):
        score(weights, b"abc", -1)
    with pytest.raises(TypeError, match="bytes-like|encode"):
        score(weights, "text", 1)
    with pytest.raises(ValueError, match="framework"):
        score(weights, b"abc", 1, framework="tf")
    with pytest.raises(ValueError, match="micro_batch_size"):
        score(weights, b"abc", 1, micro_batch_size=0, max_seq_len=16)
    with pytest.raises(ValueError, match="wrong decryption key"):
        score(encrypt_weights(_bytes_of(weights, SMALL))[0], b"abc", 1, key="00" * 32)
    with pytest.raises(ValueError, match="64 hex"):
        score(_bytes_of(weights, SMALL), b"abc", 1, key="abc")


def test_torch_and_flax_score_the_same():
    pytest.importorskip("flax")
    pytest.importorskip("soma_models.v1.flax.evaluate")
    from soma_models.v1.flax.modules.model import Model as FlaxModel

    weights = random_weights(DEEPER, seed=12)
    data = data_of(16 * 3 + 5, seed=3)
    # One-row batches: a single shape to compile; 4 batches give the range something to do.
    kwargs = {"sig_reg_config": SIG_REG, "max_seq_len": 16, "batch_size": 1,
              "batch_order_range": True}
    loaded = score(FlaxModel.load_bytes(_bytes_of(weights, DEEPER)), data, 5, **kwargs)
    kwargs["model_config"] = DEEPER
    torch_score = score(weights, data, 5, framework="torch", **kwargs)
    flax_score = score(weights, data, 5, framework="flax", **kwargs)
    for got in (flax_score, loaded):
        np.testing.assert_allclose(got.loss, torch_score.loss, rtol=RTOL)
        np.testing.assert_allclose(got.embedding, torch_score.embedding, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose([got.range.low, got.range.high],
                                   [torch_score.range.low, torch_score.range.high], rtol=RTOL)


# --------------------------------------------------------------------------- batch order

def interleavings(run_lengths: list[int]):
    """Every arrival order: sequences of run labels with the runs' multiplicities."""
    labels = [r for r, n in enumerate(run_lengths) for _ in range(n)]
    return set(itertools.permutations(labels))


def brute_force_extremes(cost: np.ndarray, run_lengths: list[int]) -> tuple[float, float]:
    starts = np.concatenate([[0], np.cumsum(run_lengths)[:-1]])
    totals = []
    for order in interleavings(run_lengths):
        done = [0] * len(run_lengths)
        total = 0.0
        for slot, run in enumerate(order):
            total += cost[starts[run] + done[run], slot]
            done[run] += 1
        totals.append(total)
    return min(totals), max(totals)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 9])
def test_batch_order_extremes_match_brute_force(n):
    cost = np.random.default_rng(n).standard_normal((n, n))
    lengths = [len(r) for r in batch_order.worker_runs(n)]
    assert sum(lengths) == n and lengths == sorted(lengths, reverse=True)
    assert max(lengths) - min(lengths) <= 1
    assert batch_order.order_count(n) == len(interleavings(lengths))
    low, high, exact = batch_order.extreme_sums(cost)
    assert exact
    np.testing.assert_allclose([low, high], brute_force_extremes(cost, lengths), rtol=1e-12)
    # Feasible slots are exactly the slots some order gives each batch.
    seen = [set() for _ in range(n)]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for order in interleavings(lengths):
        done = [0] * 4
        for slot, run in enumerate(order):
            seen[starts[run] + done[run]].add(slot)
            done[run] += 1
    assert [set(s) for s in batch_order.feasible_slots(n)] == seen


def test_batch_order_bound_contains_exact_range(monkeypatch):
    cost = np.random.default_rng(0).standard_normal((9, 9))
    low, high, _ = batch_order.extreme_sums(cost)
    monkeypatch.setattr(batch_order, "MAX_EXACT_STATES", 1)
    loose_low, loose_high, exact = batch_order.extreme_sums(cost)
    assert not exact and loose_low <= low and loose_high >= high


def test_score_range_matches_brute_force_over_orders():
    """Range over orders from the NumPy reference's per-(batch, noise slot) losses."""
    weights = random_weights(SMALL, seed=13)
    data = data_of(8 * 6 - 3, seed=4)  # 6 one-row batches: runs of 2, 2, 1, 1
    seed = 21
    got = score(weights, data, seed, model_config=SMALL, sig_reg_config=SIG_REG, max_seq_len=8,
                batch_size=1, batch_order_range=True)
    batches = ref.per_batch(weights, data, sizes_of(SMALL), 8, 1)
    n = len(batches)
    noises = [ref.noise(seed, k, SMALL.embedding_dim, SLICES) for k in range(n)]
    loss = np.array([[b.ce_sum / b.positions + 0.02 * ref.sig_reg(b.reps, noises[k], 3.0, 17)
                      for k in range(n)] for b in batches])
    low, high = brute_force_extremes(loss, [2, 2, 1, 1])
    assert got.range.exact and got.range.orders == 180 and got.range.n_batches == n
    np.testing.assert_allclose([got.range.low, got.range.high], [low / n, high / n], rtol=RTOL)
    assert got.range.low <= got.loss + 1e-6 and got.loss <= got.range.high + 1e-6
    assert got.range.high - got.range.low > 1e-4  # the orders really differ


def test_range_refuses_too_many_batches(monkeypatch):
    from soma_models.v1 import scoring

    monkeypatch.setattr(scoring, "MAX_RANGE_BATCHES", 2)
    with pytest.raises(ValueError, match="refusing 3 batches"):
        score(random_weights(SMALL, 0), b"x" * 20, 1, max_seq_len=8, batch_size=1,
              batch_order_range=True)


# --------------------------------------------------------------------------- competition

def test_compete_winner_distance_and_losses():
    data = data_of(50, seed=5)
    kwargs = {"model_config": SMALL, "sig_reg_config": SIG_REG, "max_seq_len": 16, "batch_size": 2}
    candidates = [random_weights(SMALL, seed=s) for s in (20, 21, 22)]
    singles = [score(w, data, 3, **kwargs) for w in candidates]
    target = np.random.default_rng(0).standard_normal(SMALL.embedding_dim)
    result = compete(candidates, data, 3, target, **kwargs)
    assert isinstance(result, Competition)
    assert result.losses == [s.loss for s in singles]
    expected_winner = int(np.argmin([s.loss for s in singles]))
    assert result.winner == expected_winner and result.loss == singles[expected_winner].loss
    np.testing.assert_array_equal(result.embedding, singles[expected_winner].embedding)
    a = singles[expected_winner].embedding.astype(np.float64)
    cos = a @ target / np.linalg.norm(a) / np.linalg.norm(target)
    np.testing.assert_allclose(result.distance, 1.0 - cos, rtol=1e-5, atol=1e-6)
    assert isinstance(result.scores[0], Score)


def test_compete_tie_goes_to_the_first_and_zero_target_gives_nan():
    weights = random_weights(SMALL, seed=30)
    data = data_of(20)
    kwargs = {"sig_reg_config": SIG_REG, "max_seq_len": 16, "batch_size": 2}
    result = compete([weights, dict(weights)], data, 1, np.zeros(SMALL.embedding_dim), **kwargs)
    assert result.losses[0] == result.losses[1] and result.winner == 0
    assert np.isnan(result.distance)
    assert compete([weights], data, 1, None, **kwargs).distance is None
    with pytest.raises(ValueError, match="target embedding has 3 values"):
        compete([weights], data, 1, [1.0, 2.0, 3.0], **kwargs)
    with pytest.raises(ValueError, match="1 keys for 2 weights"):
        compete([weights, weights], data, 1, keys=[None], **kwargs)


def runtime_argmin(losses):
    """The runtime's argmin written out: a strict `<` against the best so far."""
    best = 0
    for i in range(1, len(losses)):
        if losses[i] < losses[best]:
            best = i
    return best


NAN = float("nan")


@pytest.mark.parametrize("losses, winner", [
    ([3.0, 1.0, 1.0], 1),          # first of a tie
    ([NAN, 2.0], 0),               # NaN at index 0 wins: nothing compares below it
    ([NAN, 0.5, 0.1], 0),
    ([2.0, NAN, 1.0], 2),          # NaN elsewhere is passed over
    ([2.0, NAN], 0),
    ([NAN, NAN], 0),
    ([1.0, NAN, NAN], 0),
])
def test_nan_winner_rule(losses, winner):
    assert pick_winner(losses) == winner == runtime_argmin(losses)


def test_compete_warns_in_one_line_on_a_nan_loss():
    data = data_of(40)
    good = random_weights(SMALL, 1)
    broken = dict(good)
    broken["predictor.bias"] = good["predictor.bias"].copy()
    broken["predictor.bias"][3] = np.nan
    kwargs = {"model_config": SMALL, "sig_reg_config": SIG_REG, "max_seq_len": 16,
              "batch_size": 2}
    with pytest.warns(NaNLossWarning, match="index 0 is NaN, so it wins") as record:
        result = compete([broken, good], data, 7, **kwargs)
    assert result.winner == 0 and np.isnan(result.loss) and not np.isnan(result.losses[1])
    assert len(record) == 1 and "\n" not in str(record[0].message)
    with pytest.warns(NaNLossWarning, match="passed over"):
        result = compete([good, broken], data, 7, **kwargs)
    assert result.winner == 0 and result.loss == result.losses[0]


def test_winner_and_distance_rules():
    assert np.isnan(cosine_distance(np.zeros(4), np.ones(4)))
    np.testing.assert_allclose(cosine_distance([1, 0], [0, 1]), 1.0)
    np.testing.assert_allclose(cosine_distance([1, 1], [2, 2]), 0.0, atol=1e-7)
    np.testing.assert_allclose(cosine_distance([1, 0], [-1, 0]), 2.0)


def test_reexports_from_scoring():
    assert callable(validate) and len(commitment(b"", protocol="0.1.1")) == 64



# --------------------------------------------------------------------------- stored dtypes

def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (torch's rule)."""
    torch = pytest.importorskip("torch")
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")


def safetensors_with_dtypes(tensors: dict[str, tuple[str, np.ndarray]]) -> bytes:
    """A safetensors file written by the `safetensors` package itself (through torch, which
    has a bfloat16 dtype), independently of our writer."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    as_torch = {"BF16": lambda a: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16),
                "F64": torch.from_numpy}
    return save({k: as_torch[d](a) for k, (d, a) in tensors.items()})


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_bf16_and_f64_files_score_exactly_as_their_float32_conversion(framework, tmp_path):
    if framework == "flax":
        pytest.importorskip("flax")
    weights = random_weights(SMALL, 31)
    data, seed = data_of(150), 7
    sizes = {"sig_reg_config": SIG_REG, "max_seq_len": 32, "batch_size": 4,
             "framework": framework}
    # BF16: the runtime widens exactly, so the float32 file holds the widened values.
    bf16 = {k: ("BF16", bf16_bits(v)) for k, v in weights.items()}
    widened = {k: (bits.astype(np.uint32) << 16).view(np.float32) for k, (_, bits) in bf16.items()}
    # F64: values that are not float32, rounded to nearest on load.
    rng = np.random.default_rng(5)
    wide = {k: v.astype(np.float64) + rng.standard_normal(v.shape) * 1e-9
            for k, v in weights.items()}
    rounded = {k: v.astype(np.float32) for k, v in wide.items()}
    assert any(not np.array_equal(rounded[k].astype(np.float64), wide[k]) for k in wide)
    pairs = [(safetensors_with_dtypes(bf16), widened),
             (safetensors_with_dtypes({k: ("F64", v) for k, v in wide.items()}), rounded)]
    for stored, as_float32 in pairs:
        path = tmp_path / "stored.safetensors"
        path.write_bytes(stored)
        with pytest.warns(UserWarning, match="converted to float32"):
            got = score(path, data, seed, **sizes)
        want = score(as_float32, data, seed, **sizes)
        assert got.loss == want.loss
        np.testing.assert_array_equal(got.embedding, want.embedding)
