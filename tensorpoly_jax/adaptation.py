"""How a held-out task is adapted from a pretrained routed adapter (gin ``ADAPT_MODE``).

- ``full``: a new router row (uniform ±1e-3, as at init) and every adapter param train (T-Few).
- ``router`` / ``router_mu``: only the new row trains (Poly-z / MHR-z of Caccia et al. 2023), from
  the init draw or from the mean of the trained tasks' rows (MHR-μ); every other param is frozen.
- ``uniform`` / ``frozen_average`` / ``arrow``: nothing trains (zero-shot). The new row weighs the
  skills equally, or as the trained tasks do on average (their weights' mean); ``arrow`` gives no
  row: each token routes itself by the skills' prototypes (``arrow``).

Rows are ``skill_logits[T:]`` of every router; params here are in the per-layer layout (the task
axis leads) unless said otherwise.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from tensorpoly_jax.param_roles import param_role
from tensorpoly_jax.routing import LOGIT_INIT_RANGE, NORMALIZE_EPSILON

MODES = ("full", "router", "router_mu", "uniform", "frozen_average", "arrow")
ROUTER_ONLY = ("router", "router_mu")
ZERO_SHOT = ("uniform", "frozen_average", "arrow")


def check_mode(mode: str, adapter=None) -> None:
  """Refuses an unknown mode, or (given the pretrained ``adapter``'s config) a routing-only mode
  for a method without a router."""
  if mode not in MODES:
    raise ValueError(f"ADAPT_MODE={mode!r} is unknown; choose one of {MODES}.")
  if adapter is not None and mode != "full" and not adapter.routed:
    raise ValueError(
        f"ADAPT_MODE={mode!r} adapts the routing only, and {adapter.method} has no router: use"
        " ADAPT_MODE='full', or a routed method (poly, mhr, tensorpoly_i, tensorpoly_ii).")


def trains(mode: str) -> bool:
  return mode not in ZERO_SHOT


def gives_row(mode: str) -> bool:
  return mode != "arrow"


def _router_paths(flat: dict) -> list:
  return sorted(path for path in flat if param_role(path) == "router")


def new_rows(adapter_params, mode: str, seed: int) -> dict:
  """``{router path: [1, h, s] logits}``: the held-out task's row of every router."""
  flat = traverse_util.flatten_dict(unfreeze(adapter_params))
  rng = np.random.default_rng(seed)
  rows = {}
  for path in _router_paths(flat):  # the draws go to routers in one order, whatever the dict's
    logits = np.asarray(flat[path], np.float32)  # [T, h, s]
    if mode in ("full", "router"):
      row = rng.uniform(-LOGIT_INIT_RANGE, LOGIT_INIT_RANGE, (1, *logits.shape[1:]))
    elif mode == "router_mu":
      row = logits.mean(axis=0, keepdims=True)
    elif mode == "uniform":
      row = np.zeros((1, *logits.shape[1:]))
    elif mode == "frozen_average":
      row = logits_for(average_weights(logits))[None]
    else:
      raise ValueError(f"ADAPT_MODE={mode!r} gives the task no router row.")
    rows[path] = row.astype(np.float32)
  return traverse_util.unflatten_dict(rows)


def average_weights(logits: np.ndarray) -> np.ndarray:
  """``[h, s]``: the mean over tasks of the router's weights ``sigmoid(l) / Σ_s sigmoid(l)``."""
  gates = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  return (gates / (gates.sum(axis=-1, keepdims=True) + NORMALIZE_EPSILON)).mean(axis=0)


def logits_for(weights: np.ndarray) -> np.ndarray:
  """Logits whose router weights are ``weights`` (``[..., s]``, positive, summing to 1): the
  sigmoids are the weights scaled to peak at 1/2, which the router's normalization undoes."""
  gates = weights / (2.0 * weights.max(axis=-1, keepdims=True))
  return np.log(gates) - np.log1p(-gates)


def append_rows(params, rows) -> dict:
  """``params`` (adapter params, or the whole model's) with ``rows`` appended to the routers'
  logits on the task axis (axis -3, either layout)."""
  flat = traverse_util.flatten_dict(unfreeze(params))
  for path, row in traverse_util.flatten_dict(unfreeze(rows)).items():
    flat[path] = _concat([flat[path], row])
  return traverse_util.unflatten_dict(flat)


def _concat(parts):
  if all(isinstance(p, np.ndarray) for p in parts):
    return np.concatenate(parts, axis=-3)
  return jnp.concatenate([jnp.asarray(p) for p in parts], axis=-3)


@dataclasses.dataclass(frozen=True)
class RouterRows:
  """The params a router-only run trains: the rows from ``first_row`` on of every router's skill
  logits, split from the frozen rest (``trainer.Trainer``'s ``trained``); works on param trees
  in either layout and on their sharding trees (both parts keep the router's sharding)."""

  first_row: int

  def split(self, params) -> tuple[dict, dict]:
    flat = traverse_util.flatten_dict(unfreeze(params))
    trained = {}
    for path in _router_paths(flat):
      value = flat[path]
      if isinstance(value, jax.sharding.Sharding):
        trained[path] = value
      else:
        trained[path] = value[..., self.first_row:, :, :]
        flat[path] = value[..., :self.first_row, :, :]
    return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(flat)

  def merge(self, trained, frozen) -> dict:
    return append_rows(frozen, trained)
