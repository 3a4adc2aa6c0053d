import jax
import numpy as np
import pytest

from tensorpoly_jax import entangle as ent
from tests import numpy_reference as ref


def test_paper_example_512_from_q8_n3_r2_has_48_numbers():
  assert ent.leaf_size(512, 3) == 8
  assert ent.entangled_size(512, order=3, rank=2) == 48
  leaves = np.random.default_rng(0).normal(size=(3, 2, 1, 8)).astype(np.float32)
  assert leaves.size == 48
  vectors = ent.entangle(leaves, 512)
  assert vectors.shape == (2, 1, 512)
  np.testing.assert_allclose(vectors, ref.build_vectors(leaves, 512), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim,order", [(50, 1), (50, 2), (50, 3), (50, 4), (64, 2), (81, 4), (7, 3)])
def test_leaf_size_is_smallest_covering_q(dim, order):
  q = ent.leaf_size(dim, order)
  assert q == ref.leaf_size(dim, order)
  assert q**order >= dim and (q - 1) ** order < dim


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [50, 64])  # 50 needs truncation for every order
def test_plain_product_matches_kron_loops(order, dim):
  q = ref.leaf_size(dim, order)
  leaves = np.random.default_rng(order).normal(size=(order, 3, 2, q)).astype(np.float32)
  built = jax.jit(ent.entangle, static_argnums=(1, 2))(leaves, dim, "none")
  np.testing.assert_allclose(built, ref.build_vectors(leaves, dim), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [2, 4])
@pytest.mark.parametrize("dim", [50, 81])
@pytest.mark.parametrize("positions", [0, 1, 2])
def test_pair_layernorm_matches_kron_loops(order, dim, positions):
  q = ref.leaf_size(dim, order)
  rng = np.random.default_rng(10 * order + positions)
  leaves = rng.normal(size=(order, 3, 2, q)).astype(np.float32)
  scales = biases = None
  if positions:
    positions = min(positions, order // 2)
    scales = rng.normal(size=(positions, 2, q * q)).astype(np.float32)
    biases = rng.normal(size=(positions, 2, q * q)).astype(np.float32)
  built = ent.entangle(leaves, dim, "layernorm", scales, biases)
  expected = ref.build_vectors(leaves, dim, "layernorm", scales, biases)
  np.testing.assert_allclose(built, expected, rtol=1e-4, atol=1e-4)


def test_batched_leaves_build_per_example():
  leaves = np.random.default_rng(3).normal(size=(5, 2, 1, 2, 4)).astype(np.float32)
  built = ent.entangle(leaves, 10, "layernorm")
  for b in range(5):
    np.testing.assert_allclose(built[b], ref.build_vectors(leaves[b], 10, "layernorm"),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("epsilon", [1e-5, 1e-2])
def test_pair_layernorm_epsilon_matches_kron_loops(epsilon):
  leaves = 0.1 * np.random.default_rng(4).normal(size=(4, 2, 2, 3)).astype(np.float32)
  built = ent.entangle(leaves, 70, "layernorm", epsilon=epsilon)
  np.testing.assert_allclose(built, ref.build_vectors(leaves, 70, "layernorm", eps=epsilon),
                             rtol=1e-4, atol=1e-6)


def test_tiny_pairs_stay_tiny_under_pytorch_epsilon():
  # Init-scale leaves: pair products (~1e-4) have variance far below eps, so the pair is scaled
  # by ~1/sqrt(eps) rather than to unit variance, and the starting update stays small.
  leaves = 0.01 * np.random.default_rng(0).normal(size=(2, 1, 1, 46)).astype(np.float32)
  built = np.asarray(ent.entangle(leaves, 2048, "layernorm"))
  assert built.std() < 0.1
  big = np.asarray(ent.entangle(100 * leaves, 2048, "layernorm"))
  assert 0.9 < big.std() < 1.1  # the same pair well above eps is normalized to unit variance


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=8, order=0), "order must be an integer >= 1, got 0"),
    (dict(dim=0, order=2), "dim must be an integer >= 1, got 0"),
])
def test_bad_sizes_name_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ent.leaf_size(**kwargs)


def test_layernorm_needs_even_order():
  leaves = np.ones((3, 1, 1, 4), np.float32)
  with pytest.raises(ValueError, match="even order N, got N=3"):
    ent.entangle(leaves, 64, "layernorm")
  with pytest.raises(ValueError, match="pair_norm must be one of"):
    ent.entangle(leaves, 64, "batchnorm")


def test_too_small_leaves_rejected():
  with pytest.raises(ValueError, match="span 16 < dim=20"):
    ent.entangle(np.ones((2, 1, 1, 4), np.float32), 20)
