"""Transforms: identity and the seeded randomised Hadamard rotation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorwire.kv.stage import ShapeMismatch, Stage, StageConfigError
from tensorwire.kv.transforms.hadamard import Hadamard, random_signs, rotation_matrix
from tensorwire.kv.transforms.identity import Identity
from tensorwire.testing.conformance import TransformSuite
from tensorwire.testing.strategies import kv_tensor


shapes = st.tuples(
    st.integers(1, 2),  # batch
    st.integers(1, 4),  # kv heads
    st.sampled_from([1, 7, 300]),  # tokens
    st.sampled_from([2, 8, 64, 128]),  # head_dim
)

TRANSFORMS = [Identity(), Hadamard(), Hadamard(seed=12345, keys=True, values=False), Hadamard(seed=3, keys=False)]


class TestTransformConformance(TransformSuite):
    stages = TRANSFORMS


def test_identity_returns_its_inputs() -> None:
    rng = np.random.default_rng(0)
    k, v = kv_tensor((1, 2, 7, 64), rng), kv_tensor((1, 2, 7, 64), rng)
    assert Identity.lossless
    assert Identity().forward(3, k, v) == (k, v)
    assert Identity().inverse(3, k, v) == (k, v)


@given(shape=shapes, seed=st.integers(0, 2**32), data_seed=st.integers(0, 2**16))
def test_hadamard_round_trip_error_is_about_1e6(shape, seed, data_seed) -> None:
    rng = np.random.default_rng(data_seed)
    keys, values = kv_tensor(shape, rng), kv_tensor(shape, rng)
    stage = Hadamard(seed=seed)
    rk, rv = stage.forward(0, keys, values)
    assert rk.dtype == rv.dtype == np.float32 and rk.shape == rv.shape == shape
    back_k, back_v = stage.inverse(0, rk, rv)
    for x, back in ((keys, back_k), (values, back_v)):
        # Per token: worst element error relative to the token's largest element.
        rel = np.abs(back - x).max(axis=-1) / np.abs(x).max(axis=-1)
        assert rel.max() < 2e-6
    assert not Hadamard.lossless


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_hadamard_preserves_norms_and_dot_products(shape, seed) -> None:
    rng = np.random.default_rng(seed)
    keys, queries = kv_tensor(shape, rng), kv_tensor(shape, rng)
    rk, rq = Hadamard(seed=seed).forward(0, keys, queries)
    # Norms: key_norm selection gives the same answer before and after the rotation.
    np.testing.assert_allclose(np.linalg.norm(rk, axis=-1), np.linalg.norm(keys, axis=-1), rtol=1e-5)
    # Dot products: attention scores are unchanged when queries are rotated alike.
    dots = np.einsum("bhtd,bhtd->bht", keys.astype(np.float64), queries)
    rdots = np.einsum("bhtd,bhtd->bht", rk.astype(np.float64), rq)
    scale = np.linalg.norm(keys, axis=-1) * np.linalg.norm(queries, axis=-1)
    assert (np.abs(dots - rdots) / scale).max() < 1e-5


@pytest.mark.parametrize("head_dim", [1, 2, 4, 64, 128, 256])
def test_rotation_matrix_is_a_signed_scaled_sylvester_hadamard(head_dim: int) -> None:
    m = rotation_matrix(5, head_dim).astype(np.float64)
    np.testing.assert_allclose(m @ m.T, np.eye(head_dim), atol=1e-6)
    np.testing.assert_allclose(np.abs(m), 1 / np.sqrt(head_dim), rtol=1e-6)
    # Row i is signs[i] times row i of the Sylvester matrix: H[i, j] = (-1)^popcount(i & j).
    sylvester = np.array([[(-1) ** (i & j).bit_count() for j in range(head_dim)] for i in range(head_dim)])
    np.testing.assert_allclose(m * np.sqrt(head_dim), random_signs(5, head_dim)[:, None] * sylvester, atol=1e-6)
    assert rotation_matrix(5, head_dim) is rotation_matrix(5, head_dim)  # cached
    assert not rotation_matrix(5, head_dim).flags.writeable


def test_random_signs_are_frozen() -> None:
    # A receiver rebuilds the rotation from the seed: this stream must never change.
    assert random_signs(0, 16).tolist() == [-1, -1, -1, -1, -1, 1, -1, 1, 1, -1, 1, 1, 1, 1, 1, -1]
    assert random_signs(0, 8).tolist() == random_signs(0, 16)[:8].tolist()
    assert random_signs(1, 64).tolist() != random_signs(0, 64).tolist()


def test_seed_changes_the_rotation() -> None:
    x = kv_tensor((1, 1, 7, 64), np.random.default_rng(1))
    a = Hadamard(seed=1).forward(0, x, x)[0]
    b = Hadamard(seed=2).forward(0, x, x)[0]
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, Hadamard(seed=1).forward(0, x, x)[0])


def test_keys_and_values_flags() -> None:
    rng = np.random.default_rng(2)
    k, v = kv_tensor((2, 3, 7, 64), rng), kv_tensor((2, 3, 7, 64), rng)
    fk, fv = Hadamard(keys=False).forward(0, k, v)
    assert fk is k and not np.allclose(fv, v)
    fk, fv = Hadamard(values=False).forward(0, k, v)
    assert fv is v and not np.allclose(fk, k)
    ik, iv = Hadamard(values=False).inverse(0, fk, fv)
    assert iv is v
    np.testing.assert_allclose(ik, k, rtol=0, atol=2e-6 * np.abs(k).max())


def test_hadamard_commutes_with_token_selection() -> None:
    rng = np.random.default_rng(3)
    k = kv_tensor((2, 3, 300, 64), rng)
    idx = np.sort(rng.permutation(300)[:40])
    stage = Hadamard(seed=9)
    selected_first = stage.forward(0, k[:, :, idx], k[:, :, idx])[0]
    rotated_first = stage.forward(0, k, k)[0][:, :, idx]
    # Same vectors up to float32 rounding, not bit for bit: BLAS may pick other kernels
    # (another summation order) for 40 tokens than for 300. Each element is a sum of d = 64
    # products; two orders differ by at most 2 * gamma_d * sum_i |x_i| |m_ij| with
    # gamma_d ~ d * eps / 2 (Higham, Accuracy and Stability, 3.1): d * eps * max(|x| @ |m|).
    m = np.abs(rotation_matrix(9, 64).astype(np.float64))
    atol = 64 * np.finfo(np.float32).eps * (np.abs(k[:, :, idx].astype(np.float64)) @ m).max()
    np.testing.assert_allclose(selected_first, rotated_first, rtol=0, atol=atol)


def test_hadamard_spreads_an_outlier_channel() -> None:
    # One channel 50x larger than the rest: a per-token scale is set by it, so a 4-bit grid
    # leaves the other channels with one or two levels. After the rotation the per-token
    # max/mean ratio is close to that of a Gaussian, and the quantization error drops.
    rng = np.random.default_rng(4)
    k = rng.standard_normal((1, 2, 300, 64)).astype(np.float32)
    k[..., 17] *= 50.0

    def max_over_mean(x: np.ndarray) -> float:
        a = np.abs(x)
        return float(np.median(a.max(axis=-1) / a.mean(axis=-1)))

    def int4(x: np.ndarray) -> np.ndarray:  # symmetric per-token 4-bit round trip
        scale = np.abs(x).max(axis=-1, keepdims=True) / 7
        return np.round(x / scale) * scale

    stage = Hadamard(seed=0)
    rotated = stage.forward(0, k, k)[0]
    assert max_over_mean(k) > 20
    assert max_over_mean(rotated) < 4
    restored = stage.inverse(0, int4(rotated), int4(rotated))[0]
    assert np.abs(restored - k).mean() < 0.5 * np.abs(int4(k) - k).mean()


def test_hadamard_accepts_other_float_dtypes() -> None:
    x = kv_tensor((1, 1, 7, 8), np.random.default_rng(5)).astype(np.float16)
    k, v = Hadamard().forward(0, x, x.astype(np.float64))
    assert k.dtype == v.dtype == np.float32


@pytest.mark.parametrize("head_dim", [96, 3, 0])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_hadamard_rejects_a_head_dim_that_is_not_a_power_of_two(head_dim: int, direction: str) -> None:
    x = np.ones((1, 2, 7, head_dim), dtype=np.float32)
    with pytest.raises(ShapeMismatch, match=f"layer 4 keys have head_dim {head_dim}.*power-of-two.*identity"):
        getattr(Hadamard(), direction)(4, x, x)


def test_hadamard_checks_the_values_head_dim_too() -> None:
    k, v = np.ones((1, 1, 3, 64), dtype=np.float32), np.ones((1, 1, 3, 48), dtype=np.float32)
    with pytest.raises(ShapeMismatch, match="values have head_dim 48"):
        Hadamard(keys=False).forward(0, k, v)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"seed": 1.5}, "seed must be an int >= 0"),
        ({"seed": True}, "seed must be an int >= 0"),
        ({"keys": "yes"}, "keys must be a bool"),
        ({"values": 1}, "values must be a bool"),
    ],
)
def test_hadamard_rejects_bad_parameters(params: dict, message: str) -> None:
    with pytest.raises(StageConfigError, match=message):
        Hadamard(**params)
    with pytest.raises(StageConfigError, match=message):
        Stage.from_config({"id": "hadamard", **params})


def test_identity_takes_no_parameters() -> None:
    with pytest.raises(StageConfigError, match="no parameter"):
        Stage.from_config({"id": "identity", "seed": 1})
