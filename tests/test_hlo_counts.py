"""Kernel counts of compiled HLO: hand-counted text, and scans whose body runs per iteration on
this CPU and in a program compiled for a TPU."""
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from tensorpoly_jax.hlo_counts import kernel_counts

HLO = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %a = f32[4]{0} add(%p, %p)
  ROOT %m = f32[4]{0} multiply(%a, %a)
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/adapter/mul"}
  ROOT %out = (s32[], f32[4]{0}) tuple(%next, %f)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%callee (y: f32[4]) -> f32[4] {
  %y = f32[4]{0} parameter(0)
  ROOT %s = f32[4]{0} sine(%y)
}

%two_ops (y: f32[4]) -> f32[4] {
  %y = f32[4]{0} parameter(0)
  %c = f32[4]{0} cosine(%y)
  ROOT %e = f32[4]{0} exponential(%c)
}

ENTRY %main (x: f32[4], k: s32[]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %k = s32[] parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %x)
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %r = f32[4]{0} get-tuple-element(%w), index=1
  %c = f32[4]{0} call(%r), to_apply=%callee
  %b = f32[4]{0} conditional(%k, %c, %c), branch_computations={%callee, %two_ops}
  %cs = (f32[4]{0}, f32[4]{0}, u32[]) copy-start(%b)
  %cd = f32[4]{0} copy-done(%cs)
  %v = f32[4]{0} bitcast(%cd)
  ROOT %e = f32[4]{0} exponential(%v)
}
"""


def test_hand_counted_module():
  # body: add + fusion, 3 times; entry: the call's sine, the conditional's larger branch (2), one
  # asynchronous copy (start and done) and the exponential (the bitcast is free).
  expected = {"ops": 3 * 2 + 1 + 2 + 1 + 1, "fusions": 3, "unknown_trip_counts": 0}
  assert kernel_counts(HLO) == expected
  # Without XLA's known trip count (TPU), the bound comes from the scan's condition...
  unknown = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
  assert kernel_counts(unknown) == expected
  assert kernel_counts(unknown.replace("constant(3)", "constant(5)"))["fusions"] == 5
  # ...and without either, the body counts once and the loop is reported.
  dynamic = unknown.replace("compare(%i, %n)", "compare(%i, %i)")
  assert kernel_counts(dynamic) == {"ops": 2 + 5, "fusions": 1, "unknown_trip_counts": 1}
  # Fusions grouped by the JAX op path they came from, per iteration too.
  by_path = kernel_counts(HLO, group=lambda op: op.split("/")[1] if op else "unnamed")
  assert by_path["fusions_by_group"] == {"adapter": 3}


def _scan_text(length: int, sharding=None) -> str:
  """The compiled text of a ``length``-step scan (for ``sharding``'s device; default: this CPU)."""
  def f(x):
    def body(carry, _):
      return jnp.sin(carry) @ carry, None
    return jax.lax.scan(body, x, None, length=length)[0]
  return jax.jit(f).lower(jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding)
                          ).compile().as_text()


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_a_scan_body_counts_once_per_iteration(platform):
  sharding = None
  if platform == "tpu":
    if importlib.util.find_spec("libtpu") is None:
      pytest.skip("compiling for a TPU topology needs libtpu (pip install 'tensorpoly-jax[tpu]')")
    from tensorpoly_jax import aot

    sharding = jax.sharding.SingleDeviceSharding(aot.target_devices("v4:2x2x1")[0])
  counts = {n: kernel_counts(_scan_text(n, sharding)) for n in (4, 9, 14)}
  assert all(c["unknown_trip_counts"] == 0 for c in counts.values())
  step = counts[9]["ops"] - counts[4]["ops"]
  assert step > 0 and counts[14]["ops"] - counts[9]["ops"] == step  # 5 more iterations each
