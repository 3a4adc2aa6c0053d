import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from flax.core import unfreeze

from tensorpoly_jax import entangle as ent
from tensorpoly_jax.adapters import (LoRAConfig, MHRConfig, PolyConfig, TensorPolyIConfig,
                                     TensorPolyIIConfig, TLoRAConfig)
from tensorpoly_jax.methods import adapter_config
from tensorpoly_jax.routing import Router
from tensorpoly_jax.t5.layers import DenseGeneral
from tensorpoly_jax.t5.model import EncoderDecoder, abstract_variables, preset, split_params
from tests import numpy_reference as ref
from tests.small_adapters import small_adapter

D_IN, D_OUT, TOKENS, TASKS = 12, 20, 5, 4


def routed_tasks(config) -> int:
  return config.n_tasks if config.routed else 1


def init_layer(config, batch=3, seed=0, randomize=True):
  layer = DenseGeneral(D_OUT, kernel_axes=("embed", "mlp"), adapter=config)
  x = jax.random.normal(jax.random.PRNGKey(seed), (batch, TOKENS, D_IN))
  task_ids = jnp.arange(batch) % routed_tasks(config)
  params = unfreeze(layer.init(jax.random.PRNGKey(seed + 1), x, task_ids)["params"])
  if randomize:  # non-zero B and distinct routing rows, so every part of the adapter matters
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(flat))
    flat = {k: (v if k[-1] == "kernel" else 0.5 * jax.random.normal(key, v.shape))
            for key, (k, v) in zip(keys, flat.items())}
    params = traverse_util.unflatten_dict(flat)
  return layer, params, x, task_ids


def np_params(params):
  return jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), params)


# ---------------------------------------------------------------- PEFT parity (PyTorch, CPU)


def peft_output(peft_layer, x, task_ids=None):
  with torch.no_grad():
    kwargs = {} if task_ids is None else {"task_ids": torch.tensor(np.asarray(task_ids))}
    return peft_layer(torch.tensor(np.asarray(x)), **kwargs).numpy()


def torch_base(params):
  base = torch.nn.Linear(D_IN, D_OUT, bias=False)
  base.weight.data = torch.tensor(np.asarray(params["kernel"]).T.copy())
  return base


def test_lora_matches_peft():
  from peft import LoraConfig
  from peft.tuners.lora import layer as lora_layer

  config = LoRAConfig(lora_rank=4, targets=".*")
  layer, params, x, _ = init_layer(config)
  peft_layer = lora_layer.Linear(torch_base(params), "default", LoraConfig(r=4, lora_alpha=1),
                                 r=4, lora_alpha=1)  # PEFT scales by alpha / r: alpha=1 is SPEC's 1/r
  peft_layer.lora_A["default"].weight.data = torch.tensor(np.asarray(params["adapter"]["lora_a"]).T.copy())
  peft_layer.lora_B["default"].weight.data = torch.tensor(np.asarray(params["adapter"]["lora_b"]).T.copy())
  peft_layer.eval()
  np.testing.assert_allclose(layer.apply({"params": params}, x), peft_output(peft_layer, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,splits", [("poly", 1), ("mhr", 2), ("mhr", 4)])
def test_poly_and_mhr_match_peft_poly(method, splits):
  from peft import PolyConfig
  from peft.tuners.poly import layer as poly_layer

  config = small_adapter(method, lora_rank=3, n_tasks=TASKS, skills=5, splits=splits,
                         targets=".*")
  layer, params, x, task_ids = init_layer(config, batch=6)
  adapter = params["adapter"]
  peft_layer = poly_layer.Linear(torch_base(params), "default", PolyConfig(
      r=3, n_tasks=TASKS, n_skills=5, n_splits=splits))
  peft_layer.poly_lora_A["default"].data = torch.tensor(np.asarray(adapter["lora_a"]))
  peft_layer.poly_lora_B["default"].data = torch.tensor(np.asarray(adapter["lora_b"]))
  peft_layer.poly_router["default"].module_logits.data = torch.as_tensor(
      np.asarray(adapter["router"]["skill_logits"]).reshape(TASKS, splits * 5))
  peft_layer.eval()  # PEFT samples a relaxed Bernoulli in training; eval is sigmoid, as the reference
  np.testing.assert_allclose(layer.apply({"params": params}, x, task_ids),
                             peft_output(peft_layer, x, task_ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- tensor adapters vs NumPy loops


def reference_tensor_output(config, params, x, task_ids):
  p = np_params(params)
  adapter, kernel = p["adapter"], p["kernel"]
  x = np.asarray(x, np.float64)
  eps = config.pair_norm_epsilon
  outputs = []
  for b, task in enumerate(np.asarray(task_ids)):
    if config.method == "tlora":
      a = ref.build_vectors(adapter["a"]["leaves"], D_IN, config.pair_norm, eps=eps).mean(0).T
      bb = ref.build_vectors(adapter["b"]["leaves"], D_OUT, config.pair_norm, eps=eps).mean(0)
    elif config.method == "tensorpoly_i":
      w = ref.routing_weights(adapter["router"]["skill_logits"], [task])[0, 0]
      a_vec = ref.build_vectors(adapter["a"]["leaves"], D_IN, config.pair_norm, eps=eps)
      b_vec = ref.build_vectors(adapter["b"]["leaves"], D_OUT, config.pair_norm, eps=eps)
      a = sum(w[s] * a_vec[s] for s in range(len(w))).T
      bb = sum(w[s] * b_vec[s] for s in range(len(w)))
    else:
      w = ref.routing_weights(adapter["router"]["skill_logits"], [task])[0]  # [N, S]

      def routed(side, dim):
        leaves = adapter[side]["leaves"]
        g = np.stack([sum(w[n, s] * leaves[n, s] for s in range(w.shape[1])) * w[n].sum()
                      for n in range(leaves.shape[0])])
        norm = adapter[side] if config.pair_norm == "layernorm" else {}
        return ref.build_vectors(g[:, None], dim, config.pair_norm,
                                 norm.get("norm_scale"), norm.get("norm_bias"), eps)[0]

      a, bb = routed("a", D_IN).T, routed("b", D_OUT)
    outputs.append(x[b] @ kernel + ref.adapter_delta(x[b], a, bb))
  return np.stack(outputs)


@pytest.mark.parametrize("method", ["tlora", "tensorpoly_i", "tensorpoly_ii"])
@pytest.mark.parametrize("order,pair_norm,epsilon", [
    (1, "none", 1e-5), (2, "layernorm", 1e-5), (3, "none", 1e-5), (4, "layernorm", 1e-5),
    (2, "none", 1e-5), (2, "layernorm", 0.1)])
def test_tensor_adapters_match_numpy_loops(method, order, pair_norm, epsilon):
  config = small_adapter(method, lora_rank=2, n_tasks=TASKS, skills=3, order=order,
                         pair_norm=pair_norm, pair_norm_epsilon=epsilon, targets=".*")
  layer, params, x, task_ids = init_layer(config, batch=4)
  np.testing.assert_allclose(layer.apply({"params": params}, x, task_ids),
                             reference_tensor_output(config, params, x, task_ids),
                             rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------- behaviour shared by all methods

ALL = [LoRAConfig(lora_rank=2, targets=".*"),
       TLoRAConfig(lora_rank=2, tensor_rank=2, targets=".*"),
       PolyConfig(lora_rank=2, n_tasks=TASKS, targets=".*"),
       MHRConfig(lora_rank=2, n_tasks=TASKS, n_splits=4, targets=".*"),
       TensorPolyIConfig(lora_rank=2, n_tasks=TASKS, targets=".*"),
       TensorPolyIIConfig(lora_rank=2, n_tasks=TASKS, order=4, targets=".*")]


@pytest.mark.parametrize("config", ALL, ids=lambda c: c.method)
def test_mixed_task_batch_equals_each_example_alone(config):
  layer, params, x, _ = init_layer(config, batch=6)
  task_ids = jnp.array([3, 0, 3, 1, 2, 0]) % routed_tasks(config)
  batched = layer.apply({"params": params}, x, task_ids)
  for b in range(6):
    alone = layer.apply({"params": params}, x[b:b + 1], task_ids[b:b + 1])
    # float32: a batch of 6 and of 1 take different matmul paths (outputs are O(1))
    np.testing.assert_allclose(batched[b:b + 1], alone, rtol=1e-5, atol=1e-5)
  if config.routed:  # the tasks really are routed differently
    assert not np.allclose(batched[0], layer.apply({"params": params}, x[:1], task_ids[1:2])[0])


@pytest.mark.parametrize("config", [c for c in ALL if c.method in ("lora", "poly", "mhr")],
                         ids=lambda c: c.method)
def test_zero_initialized_b_leaves_layer_unchanged(config):
  layer, params, x, task_ids = init_layer(config, randomize=False)
  frozen = DenseGeneral(D_OUT, kernel_axes=("embed", "mlp"))
  np.testing.assert_array_equal(
      layer.apply({"params": params}, x, task_ids),
      frozen.apply({"params": {"kernel": params["kernel"]}}, x))
  assert np.abs(np.asarray(params["adapter"]["lora_a"])).max() > 0


TRAINED_PAIR_NORMS = [dataclasses.replace(c, train_pair_norm=True) for c in ALL
                      if c.method in ("tensorpoly_i", "tensorpoly_ii")]
SHARED_ROUTERS = [dataclasses.replace(c, shared_router=True) for c in ALL if c.routed]


def spec_param_count(config, d_in: int, d_out: int) -> dict[str, int]:
  """SPEC's formulas for one adapted ``d_in -> d_out`` layer's trainable params, by role."""
  r = config.lora_rank
  counts = {"lora": 0, "leaf": 0, "norm": 0, "router": 0}
  if config.method == "lora":
    counts["lora"] = r * (d_in + d_out)
  elif config.method in ("poly", "mhr"):
    counts["lora"] = config.n_skills * r * (d_in + d_out)
  else:
    n, rank = config.order, config.tensor_rank
    q_in, q_out = ent.leaf_size(d_in, n), ent.leaf_size(d_out, n)
    counts["leaf"] = n * rank * r * (q_in + q_out)
    if config.pair_norm == "layernorm" and config.train_pair_norm:
      positions = ent.num_pairs(n) if config.method == "tensorpoly_ii" else 1
      counts["norm"] = 2 * r * (q_in**2 + q_out**2) * positions
  if config.routed and not config.shared_router:
    heads = (config.n_splits if config.method == "mhr" else
             config.order if config.method == "tensorpoly_ii" else 1)
    skills = config.tensor_rank if config.method.startswith("tensorpoly") else config.n_skills
    counts["router"] = config.n_tasks * heads * skills
  return {**counts, "total": sum(counts.values())}


@pytest.mark.parametrize("config", ALL + TRAINED_PAIR_NORMS + SHARED_ROUTERS,
                         ids=lambda c: c.method + ("+norms" if getattr(c, "train_pair_norm", 0)
                                                   else "+shared" if c.routed and c.shared_router
                                                   else ""))
def test_param_count_equals_spec_formulas_and_initialized_params(config):
  counts = config.param_count(D_IN, D_OUT)
  assert counts == spec_param_count(config, D_IN, D_OUT)
  if not (config.routed and config.shared_router):  # a shared router lives outside the layer
    _, params, _, _ = init_layer(config, randomize=False)
    adapter = params["adapter"]
    assert counts["total"] == sum(v.size for v in jax.tree_util.tree_leaves(adapter))
    assert counts["router"] == sum(v.size for v in jax.tree_util.tree_leaves(
        adapter.get("router", {})))


def t0_3b_layers():
  """(d_in, d_out) of the 432 layers the reference adapts in T0-3B (d_model 2048, d_ff 5120)."""
  attn, wi, wo = (2048, 2048), (2048, 5120), (5120, 2048)
  encoder = [attn] * 4 + [wi, wi, wo]
  decoder = [attn] * 8 + [wi, wi, wo]
  return encoder * 24 + decoder * 24


def t0_3b_total(config) -> int:
  return sum(count * config.param_count(*shape)["total"]
             for shape, count in collections.Counter(t0_3b_layers()).items())


def test_paper_parameter_counts_on_t0_3b():
  layers = t0_3b_layers()
  assert len(layers) == 432
  assert t0_3b_total(LoRAConfig(lora_rank=1)) == 2_211_840
  assert t0_3b_total(TLoRAConfig(lora_rank=16, tensor_rank=1, order=2)) == 1_391_616


@pytest.mark.parametrize("method,leaves,paper", [
    ("tensorpoly_i", {2: 11_132_928, 4: 3_244_032}, {2: 12.2, 4: 4.3}),
    ("tensorpoly_ii", {2: 11_132_928, 4: 3_244_032}, {2: 13.3, 4: 7.6})])
def test_t0_3b_counts_reproduce_the_paper(method, leaves, paper):
  """The real T0-3B model's adapter params (``jax.eval_shape``: nothing allocated), R=8, r=16,
  routers for the 318 training tasks: leaves and routers only, no pair-norm affines (frozen in
  the reference's released configs for both methods)."""
  for order in (2, 4):
    adapter = adapter_config(method, lora_rank=16, tensor_rank=8, order=order, n_tasks=318)
    variables = abstract_variables(EncoderDecoder(preset("t0_3b", adapter=adapter)))
    flat = traverse_util.flatten_dict(split_params(variables["params"])[0])
    counted = {kind: sum(math.prod(v.shape) for k, v in flat.items() if k[-1] == kind)
               for kind in ("leaves", "skill_logits", "norm_scale")}
    assert counted["leaves"] == leaves[order] and counted["norm_scale"] == 0
    assert round(sum(math.prod(v.shape) for v in flat.values()) / 1e6, 1) == paper[order]
    assert t0_3b_total(adapter) == sum(math.prod(v.shape) for v in flat.values())


def test_pair_norm_affines_train_only_when_asked():
  for method in ("tensorpoly_i", "tensorpoly_ii"):
    config = adapter_config(method, lora_rank=2, n_tasks=2, order=4, targets=".*")
    _, params, _, _ = init_layer(config, randomize=False)
    assert "norm_scale" not in params["adapter"]["a"]  # the reference's: identity affine
  config = TensorPolyIIConfig(lora_rank=2, n_tasks=2, order=4, targets=".*",
                              train_pair_norm=True)
  _, params, _, _ = init_layer(config, randomize=False)
  assert params["adapter"]["a"]["norm_scale"].shape == (2, 2, 2 * 2)  # one per pair position


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="tensorpoly_i", order=0), "order must be an integer >= 1, got 0"),
    (dict(method="tensorpoly_i", tensor_rank=0), "tensor_rank must be an integer >= 1, got 0"),
    (dict(method="poly", n_skills=0), "n_skills must be an integer >= 1, got 0"),
    (dict(method="poly", n_tasks=0), "n_tasks must be an integer >= 1, got 0"),
    (dict(method="poly", order=2), r"poly has no field\(s\) \['order'\]"),
    (dict(method="tlora", n_tasks=2), r"tlora has no field\(s\) \['n_tasks'\]"),
    (dict(method="mhr", n_splits=0), "n_splits must be an integer >= 1, got 0"),
    (dict(method="lora", lora_rank=0), "lora_rank must be an integer >= 1, got 0"),
    (dict(method="tensorpoly_ii", order=3), "even order N, got N=3"),
    (dict(method="tpoly"), "adapter method 'tpoly' is unknown"),
    (dict(method="mhr", n_splits=1), "mhr needs n_splits >= 2"),
    (dict(method="tlora", pair_norm_epsilon=0.0), "pair_norm_epsilon must be > 0, got 0.0"),
])
def test_bad_config_names_value_and_range(kwargs, match):
  with pytest.raises(ValueError, match=match):
    adapter_config(**kwargs)


def test_order_three_without_norm_is_fine():
  TensorPolyIIConfig(order=3, pair_norm="none")


def test_d_in_not_divisible_by_heads():
  config = MHRConfig(n_splits=5, n_tasks=2, targets=".*")
  with pytest.raises(ValueError, match="d_in=12 is not divisible by n_splits=5"):
    init_layer(config)


def test_task_ids_outside_router_rejected_where_batch_enters():
  router = Router(n_tasks=3, n_heads=1, n_skills=2)
  variables = router.init(jax.random.PRNGKey(0), jnp.array([0]))
  with pytest.raises(ValueError, match=r"task ids \[3\] are outside \[0, 3\)"):
    router.apply(variables, jnp.array([0, 3]))
  with pytest.raises(ValueError, match=r"task ids \[-1\] are outside"):
    router.apply(variables, np.array([-1]))
  # Inside jit the check cannot see values: the bad row becomes NaN instead of a clamped row.
  weights = jax.jit(router.apply)(variables, jnp.array([0, 3]))
  assert np.isfinite(weights[0]).all() and np.isnan(weights[1]).all()


def test_relaxed_bernoulli_samples_in_training_and_is_sigmoid_in_eval():
  router = Router(n_tasks=2, n_heads=2, n_skills=4, relaxed_bernoulli=True)
  variables = router.init(jax.random.PRNGKey(0), jnp.array([0]))
  eval_w = router.apply(variables, jnp.array([1, 1]))
  logits = np.asarray(variables["params"]["skill_logits"])
  np.testing.assert_allclose(eval_w, ref.routing_weights(logits, [1, 1]), rtol=1e-6)
  train_w = router.apply(variables, jnp.array([1, 1]), deterministic=False,
                         rngs={"routing": jax.random.PRNGKey(1)})
  np.testing.assert_allclose(np.asarray(train_w).sum(-1), 1.0, rtol=1e-5)
  assert not np.allclose(train_w[0], train_w[1])  # independent samples per example


def test_adapter_targets_select_layers_by_path():
  config = LoRAConfig(targets=r".*/query$")
  assert config.matches("encoder/layers_0/attention/query")
  assert not config.matches("encoder/layers_0/mlp/wi_0")


# ---------------------------------------------------------------- a seventh method


def test_a_new_method_needs_only_its_module_roles_and_config(monkeypatch):
  """What a seventh method writes (here: LoRA with a trained per-rank gate): its module, its new
  params' roles and a config class registered by name; splitting, the optimizer's groups, the
  T5X filter, counting and the export schema then serve it unchanged."""
  from flax import linen as nn

  from tensorpoly_jax import methods, optimizers, param_roles, t5x_bridge
  from tensorpoly_jax.adapters.base import Adapter

  monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
  param_roles.declare(rank_gate="lora")

  class GatedLoRA(Adapter):
    @nn.compact
    def factors(self, d_in, task_ids, routing_weights, deterministic):
      lora_a = self._param("lora_a", nn.initializers.normal(1.0), (d_in, self.lora_rank),
                           (self.in_axis, "lora_rank"))
      lora_b = self._param("lora_b", nn.initializers.normal(1.0), (self.lora_rank, self.features),
                           ("lora_rank", self.out_axis))
      rank_gate = self._param("rank_gate", nn.initializers.ones, (self.lora_rank,), ("lora_rank",))
      return lora_a * rank_gate, lora_b

  @methods.register
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class GatedLoRAConfig(methods.AdapterConfig):
    method = "gated_lora"
    module = GatedLoRA

  config = methods.from_dict({"method": "gated_lora", "lora_rank": 3, "targets": ".*"})
  assert config == GatedLoRAConfig(lora_rank=3, targets=".*") and not config.routed
  assert methods.from_dict(config.to_dict()) == config
  assert config.param_count(D_IN, D_OUT) == {"lora": 3 * (D_IN + D_OUT) + 3, "leaf": 0,
                                             "norm": 0, "router": 0,
                                             "total": 3 * (D_IN + D_OUT) + 3}
  layer, params, x, task_ids = init_layer(config, randomize=False)
  assert set(params["adapter"]) == {"lora_a", "lora_b", "rank_gate"}
  assert optimizers.group_labels(params)["adapter"]["rank_gate"] == "lora"
  assert t5x_bridge.is_adapter_param("encoder/layers_0/mlp/wo/adapter/rank_gate")
  gated = jax.tree_util.tree_map(lambda v: v, params)
  gated["adapter"]["rank_gate"] = jnp.zeros(3)  # a closed gate leaves the frozen layer alone
  frozen = DenseGeneral(D_OUT, kernel_axes=("embed", "mlp"))
  np.testing.assert_allclose(layer.apply({"params": gated}, x, task_ids),
                             frozen.apply({"params": {"kernel": params["kernel"]}}, x))
