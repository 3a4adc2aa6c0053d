"""Adaptation modes (router-only, zero-shot) and Arrow routing, against NumPy re-statements."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tensorpoly_jax import adaptation, arrow, checkpoints, commands, evaluation, pipeline, trainer
from tensorpoly_jax.adapters import LoRAConfig, PolyConfig
from tensorpoly_jax.data import embedded, tasks
from tensorpoly_jax.optimizers import OptimizerConfig
from tensorpoly_jax.routing import Router
from tests import numpy_reference as ref
from tests.small_adapters import small_adapter
from tests.test_adapters import D_IN, D_OUT, init_layer, np_params

HELDOUT = ["embedded__yew", "embedded__rowan"]


# ---------------------------------------------------------------- Arrow vs dense SVD and loops


@pytest.mark.parametrize("d_in,d_out,rank", [(12, 20, 3), (40, 8, 5), (6, 6, 6)])
def test_arrow_prototypes_equal_the_dense_svds_top_direction(d_in, d_out, rank):
  rng = np.random.default_rng(d_in)
  lora_a = rng.standard_normal((4, d_in, rank))
  lora_b = rng.standard_normal((4, rank, d_out))
  lora_b[3] = 0.0  # an untrained skill: no direction
  found = np.asarray(arrow.top_input_direction(jnp.asarray(lora_a, jnp.float32),
                                               jnp.asarray(lora_b, jnp.float32)))
  for skill in range(3):
    top = np.linalg.svd(lora_a[skill] @ lora_b[skill])[0][:, 0]
    assert abs(found[skill] @ top) == pytest.approx(1.0, abs=1e-5)
  assert not found[3].any()


def reference_skills(config, adapter, skill):
  """Skill ``skill``'s ``A_s: [d_in, r]``, ``B_s: [r, d_out]`` written out per method."""
  if config.method in ("poly", "mhr"):
    lora_a, lora_b = adapter["lora_a"], adapter["lora_b"]  # [h, s, d/h, r], [h, s, r, e/h]
    return (np.concatenate(list(lora_a[:, skill]), axis=0),
            np.concatenate(list(lora_b[:, skill]), axis=1))
  eps = config.pair_norm_epsilon

  def vectors(side, dim):
    leaves = adapter[side]["leaves"][:, skill:skill + 1]  # this skill's leaf at every order
    norm = adapter[side] if config.method == "tensorpoly_ii" and config.train_pair_norm else {}
    return ref.build_vectors(leaves, dim, config.pair_norm, norm.get("norm_scale"),
                             norm.get("norm_bias"), eps)[0]

  return vectors("a", D_IN).T, vectors("b", D_OUT)


def reference_arrow_output(config, params, x, top_k):
  p = np_params(params)
  adapter, kernel = p["adapter"], p["kernel"]
  heads = config.routing_heads
  skills = [reference_skills(config, adapter, s) for s in range(config.routed_skills)]
  d_head, e_head = D_IN // heads, D_OUT // heads
  prototypes = [[np.linalg.svd(a[h * d_head:(h + 1) * d_head] @ b)[0][:, 0] for a, b in skills]
                for h in range(heads)]
  x = np.asarray(x, np.float64)
  out = x @ kernel
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      weights = np.zeros((heads, len(skills)))
      for h in range(heads):
        x_head = x[b, t, h * d_head:(h + 1) * d_head]
        alignment = np.array([abs(x_head @ v) for v in prototypes[h]])
        chosen = np.argsort(-alignment)[:top_k]
        weights[h, chosen] = np.exp(alignment[chosen]) / np.exp(alignment[chosen]).sum()
      hidden = sum(weights[h, s] * x[b, t, h * d_head:(h + 1) * d_head]
                   @ skills[s][0][h * d_head:(h + 1) * d_head]
                   for h in range(heads) for s in range(len(skills))) / config.lora_rank
      for h in range(heads):
        out[b, t, h * e_head:(h + 1) * e_head] += sum(
            weights[h, s] * hidden @ skills[s][1][:, h * e_head:(h + 1) * e_head]
            for s in range(len(skills)))
  return out


@pytest.mark.parametrize("method,splits,top_k", [
    ("poly", 1, 2), ("mhr", 4, 3), ("tensorpoly_i", 1, 1), ("tensorpoly_ii", 1, 2)])
def test_arrow_layers_route_each_token_as_numpy_loops_do(method, splits, top_k):
  config = small_adapter(method, lora_rank=3, n_tasks=3, skills=4, splits=splits, targets=".*")
  _, params, x, task_ids = init_layer(config, batch=3)
  arrow_config = dataclasses.replace(config, arrow_top_k=top_k)
  arrow_layer, arrow_params, _, _ = init_layer(arrow_config, batch=3, randomize=False)
  # Arrow reads the task-routed layer's params, router rows included; task ids change nothing.
  assert jax.tree_util.tree_structure(arrow_params) == jax.tree_util.tree_structure(params)
  routed_output = arrow_layer.apply({"params": params}, x, task_ids)
  np.testing.assert_array_equal(routed_output, arrow_layer.apply({"params": params}, x, None))
  # Decoding caches nothing for Arrow: each step's tokens route themselves.
  decoded, cache = arrow_layer.apply({"params": params}, x, task_ids, decode=True,
                                     mutable=["cache"])
  np.testing.assert_array_equal(decoded, routed_output)
  assert not cache
  np.testing.assert_allclose(routed_output, reference_arrow_output(arrow_config, params, x, top_k),
                             rtol=2e-4, atol=2e-5)


def test_arrow_top_k_out_of_range_is_refused():
  with pytest.raises(ValueError, match=r"arrow_top_k=9 must be in \[0, 8\]"):
    PolyConfig(n_skills=8, arrow_top_k=9)


# ---------------------------------------------------------------- rows of the new task


def test_frozen_average_row_routes_as_the_trained_tasks_do_on_average():
  logits = np.random.default_rng(0).standard_normal((5, 2, 4)).astype(np.float32)
  router = Router(6, 2, 4)
  row = adaptation.logits_for(adaptation.average_weights(logits))[None].astype(np.float32)
  all_rows = {"params": {"skill_logits": np.concatenate([logits, row])}}
  weights = np.asarray(router.apply(all_rows, jnp.arange(6)))
  np.testing.assert_allclose(weights[5], weights[:5].mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(weights[:5], ref.routing_weights(logits, range(5)), rtol=1e-5)


def test_routing_modes_need_a_router_and_a_known_name():
  with pytest.raises(ValueError, match=r"ADAPT_MODE='router' adapts the routing only, and lora has"
                                       r" no router: use ADAPT_MODE='full'"):
    adaptation.check_mode("router", LoRAConfig())
  with pytest.raises(ValueError, match=r"ADAPT_MODE='zero' is unknown; choose one of \('full',"):
    adaptation.check_mode("zero", PolyConfig())
  adaptation.check_mode("full", LoRAConfig())


# ---------------------------------------------------------------- end to end on the tiny backbone


@pytest.fixture(scope="module")
def pretrained_poly(tiny_backbone_dir, tmp_path_factory):
  """A Poly adapter pretrained 2 steps on the tiny backbone: its export and the backbone."""
  tasks.register_embedded(0, embedded.Sizes(20, 2, 24, 12))
  config = train_config(steps=2, loss="lm")
  backbone = pipeline.load_backbone(tiny_backbone_dir, mesh=config.make_mesh())
  _, adapter_dir = pipeline.pretrain_adapters(
      str(tmp_path_factory.mktemp("poly")), backbone, PolyConfig(lora_rank=2, n_skills=4),
      tasks.EMBEDDED_TRAIN, config)
  return backbone, adapter_dir


def train_config(**changes):
  config = trainer.TrainConfig(steps=3, batch_size=4, inputs_length=48, targets_length=24,
                               checkpoint_every=3, log_every=1, loss="tfew",
                               optimizer=OptimizerConfig(name="adamw", learning_rate=1e-2))
  return dataclasses.replace(config, **changes)


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_router_mode_trains_only_the_new_rows_one_export_serves_every_task_zero_shot_trains_nothing(
    pretrained_poly, tmp_path):
  backbone, adapter_dir = pretrained_poly
  base, base_meta = (flat(tree) if i == 0 else tree
                     for i, tree in enumerate(checkpoints.load_adapter(adapter_dir)))
  pretraining_tasks = len(base_meta["routing_ids"])
  results = pipeline.adapt_heldout(str(tmp_path / "router"), backbone, adapter_dir, HELDOUT, 4,
                                   (0,), train_config(), mode="router")
  routers = [path for path in base if path.endswith("skill_logits")]
  assert results.adaptation_params == sum(base[p][0].size for p in routers)
  start_rows = flat(adaptation.new_rows(checkpoints.load_adapter(adapter_dir)[0], "router", 0))
  for task in HELDOUT:
    export = tmp_path / "router" / "adapt" / f"{task}_seed0" / "adapter"
    rows, meta = checkpoints.read_export(str(export))
    assert {path: row.shape for path, row in flat(rows).items()} == {
        path: (1, *base[path].shape[1:]) for path in routers}
    assert (os.path.getsize(export / checkpoints.ADAPTER_FILE)
            < os.path.getsize(os.path.join(adapter_dir, checkpoints.ADAPTER_FILE)) / 10)
    assert meta["base_adapter"]["path"] == os.path.abspath(adapter_dir)
    adapted = flat(checkpoints.load_adapter(str(export))[0])
    for path, value in base.items():  # every pretrained param bit for bit, the new row trained
      np.testing.assert_array_equal(adapted[path][:len(value)], value)
      if path in routers:
        assert adapted[path].shape[0] == pretraining_tasks + 1
        assert not np.array_equal(adapted[path][-1], start_rows[path][0])
  assert (tmp_path / "router" / "adapt" / f"{HELDOUT[0]}_seed0" / "checkpoints").is_dir()

  # One export holds both tasks' rows and routes each as its own adaptation does.
  served_config, served_params, served_meta = pipeline.with_adapter(backbone, results.exports["0"])
  assert served_meta["routing_ids"] == {**base_meta["routing_ids"],
                                        HELDOUT[0]: pretraining_tasks,
                                        HELDOUT[1]: pretraining_tasks + 1}
  served = evaluation.Scorer(pipeline.EncoderDecoder(served_config), backbone.mesh)
  own_exports = {task: pipeline.with_adapter(backbone, str(tmp_path / "router" / "adapt" / f"{task}_seed0"
                                                           / "adapter")) for task in HELDOUT}
  own = evaluation.Scorer(pipeline.EncoderDecoder(own_exports[HELDOUT[0]][0]), backbone.mesh)
  for task, (_, own_params, own_meta) in own_exports.items():
    expected = pipeline.evaluate_task(own, own_params, task, own_meta["task_id"], 48, 24)
    got = pipeline.evaluate_task(served, served_params, task,
                                 commands.routing_id(served_config, served_meta, task), 48, 24)
    np.testing.assert_array_equal(got.predictions, expected.predictions)
    assert results.accuracy[task]["0"] == pytest.approx(expected.accuracy)


  # Zero-shot modes train nothing: no step runs, and only the new row (none for Arrow) is new.
  for mode in ("uniform", "frozen_average", "arrow"):
    results = pipeline.adapt_heldout(str(tmp_path / mode), backbone, adapter_dir, HELDOUT[:1], 4,
                                     (0,), train_config(), mode=mode, arrow_top_k=2)
    run_dir = tmp_path / mode / "adapt" / f"{HELDOUT[0]}_seed0"
    assert not (run_dir / "checkpoints").exists()
    assert results.adaptation_params == 0 and results.shots == {HELDOUT[0]: 0}
    assert 0.0 <= results.accuracy[HELDOUT[0]]["0"] <= 1.0
    adapted, meta = checkpoints.load_adapter(str(run_dir / "adapter"))
    rows = flat(checkpoints.read_export(str(run_dir / "adapter"))[0])
    if mode == "arrow":
      assert rows == {} and meta["adapter"]["arrow_top_k"] == 2 and meta["task_id"] is None
      assert flat(adapted).keys() == base.keys()
      continue
    for path, value in flat(adapted).items():
      np.testing.assert_array_equal(value[:len(base[path])], base[path])
      if path in routers:
        weights = ref.routing_weights(value, range(len(value)))
        expected = (np.full_like(weights[-1], 1 / weights.shape[-1]) if mode == "uniform"
                    else weights[:-1].mean(axis=0))
        np.testing.assert_allclose(weights[-1], expected, rtol=1e-5)
    assert meta["routing_ids"] == {**base_meta["routing_ids"], HELDOUT[0]: pretraining_tasks}
