import pytest

from tensorpoly_jax import sweep


def test_grid_is_the_product_in_order():
  grid = sweep.parse_grid(["ORDER=2,4", "TENSOR_RANK=2,4,8"])
  assert len(grid) == 6 and grid[0] == {"ORDER": "2", "TENSOR_RANK": "2"}
  assert grid[-1] == {"ORDER": "4", "TENSOR_RANK": "8"}
  assert sweep.point_flags(grid[1]) == ["--gin.ORDER=2", "--gin.TENSOR_RANK=4"]
  assert sweep.point_name(grid[1]) == "ORDER=2_TENSOR_RANK=4"


@pytest.mark.parametrize("spec", ["ORDER", "ORDER=", "=2,4"])
def test_bad_sweep_spec_is_named(spec):
  with pytest.raises(ValueError, match="must look like MACRO=v1,v2"):
    sweep.parse_grid([spec])
