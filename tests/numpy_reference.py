"""Straightforward NumPy/loop re-statements of SPEC, independent of the library code."""
import math

import numpy as np

EPS = 1e-5


def leaf_size(dim, order):
  q = 1
  while q**order < dim:
    q += 1
  return q


def layer_norm_2d(matrix, scale=None, bias=None, eps=EPS):
  mean = matrix.mean()
  var = ((matrix - mean) ** 2).mean()
  out = (matrix - mean) / math.sqrt(var + eps)
  if scale is not None:
    out = out * scale + bias
  return out


def build_vectors(leaves, dim, pair_norm="none", scales=None, biases=None, eps=EPS):
  """leaves [N, R, r, q] -> [R, r, dim] by explicit kron loops (pairs LayerNorm-ed per skill)."""
  order, rank, lora_rank, _ = leaves.shape
  out = np.zeros((rank, lora_rank, dim))
  for s in range(rank):
    if pair_norm == "layernorm":
      pairs = []
      for p in range(order // 2):
        pair = np.stack([np.kron(leaves[2 * p, s, j], leaves[2 * p + 1, s, j])
                         for j in range(lora_rank)])
        k = p % len(scales) if scales is not None else None
        pairs.append(layer_norm_2d(pair, None if k is None else scales[k],
                                   None if k is None else biases[k], eps))
      for j in range(lora_rank):
        vec = pairs[0][j]
        for pair in pairs[1:]:
          vec = np.kron(vec, pair[j])
        out[s, j] = vec[:dim]
    else:
      for j in range(lora_rank):
        vec = leaves[0, s, j]
        for n in range(1, order):
          vec = np.kron(vec, leaves[n, s, j])
        out[s, j] = vec[:dim]
  return out


def routing_weights(logits, task_ids):
  """logits [T, H, S] -> [B, H, S] with sigmoid and sum normalization."""
  z = 1.0 / (1.0 + np.exp(-logits[np.asarray(task_ids)]))
  return z / (z.sum(-1, keepdims=True) + 1e-12)


def adapter_delta(x, a, b):
  """x [T, d_in] (one example), a [d_in, r], b [r, d_out] -> (x a b) / r."""
  return x @ a @ b / a.shape[1]
