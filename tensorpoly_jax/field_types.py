"""Config dataclasses refuse a field value of the wrong type when they are built: a gin binding
such as ``--gin.TRAIN_STEPS=1e3`` gives the float 1000.0, which would otherwise fail late (at
``range()``, after the backbone loads) or train with a silently different setting."""
from __future__ import annotations

import dataclasses
import numbers
import types
import typing


def check(config) -> None:
  """Raises ValueError naming the first field of ``config`` whose value is not its annotated
  type (an int is a float too; a bool is neither)."""
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    value, expected = getattr(config, field.name), hints[field.name]
    if not _matches(value, expected):
      raise ValueError(
          f"{type(config).__name__}.{field.name} must be {_name(expected)}, got {value!r}"
          f" ({type(value).__name__}); fix the gin binding that sets it (an int is written"
          " 1000, not 1e3; a string is quoted: --gin.NAME=\"'value'\").")


def _matches(value, expected) -> bool:
  origin, args = typing.get_origin(expected), typing.get_args(expected)
  if expected is typing.Any or isinstance(expected, typing.TypeVar):
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, arg) for arg in args)
  if expected is type(None):
    return value is None
  if expected is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if expected is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if origin in (tuple, list):
    if not isinstance(value, (tuple, list)):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_matches(item, args[0]) for item in value)
    return not args or (len(args) == len(value) and all(map(_matches, value, args)))
  if origin is dict or expected is dict:
    return isinstance(value, dict)
  if origin is not None:  # other generics (Mapping[...], Callable[...]): not checked
    return True
  return isinstance(value, expected)


def _name(expected) -> str:
  if typing.get_origin(expected) is None and isinstance(expected, type):
    name = expected.__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
  return str(expected).replace("typing.", "")
