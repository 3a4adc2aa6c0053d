"""How many kernels a compiled step runs: its HLO instructions and fusions, counted as executed
(a scanned block's while body once per iteration), from the compiled module's text.

On a GPU each counted instruction is a kernel launch; on a TPU or CPU it is a separately
scheduled op that reads its inputs from and writes its outputs to memory. Many small ones cost
time that the FLOPs do not show, and the counts show them on any host, without the accelerator.
"""
from __future__ import annotations

import collections
import re
from typing import Callable

# Instructions that move no data and run no kernel; an asynchronous op's ``-done`` half is the
# wait for its ``-start`` (counted once, as the start).
FREE_OPCODES = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
                          "after-all", "partition-id", "replica-id"})
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][a-z0-9-]*)\(")
_WHILE = re.compile(r"condition=%([^\s,]+), body=%([^\s,]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BOUND = re.compile(r"^\s*ROOT %\S+ = pred\[\]\S* compare\(%\S+, %(\S+)\), direction=LT")
_CONSTANT = re.compile(r"^\s*%(\S+) = s32\[\]\S* constant\((\d+)\)")
_CALLED = re.compile(r"(?:to_apply|true_computation|false_computation)=%([^\s,]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """``({name: instruction lines}, entry name)``."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = match.group(1)
        computations[current] = []
        if line.startswith("ENTRY"):
          entry = current
    elif line.strip() == "}":
      current = None
    else:
      computations[current].append(line)
  if entry is None:
    raise ValueError("the HLO text has no ENTRY computation; pass compiled.as_text().")
  return computations, entry


def _trip_count(while_line: str, condition: list[str]) -> int | None:
  """XLA's ``known_trip_count`` where it records one (CPU, GPU); else the bound of a scan's
  condition, ``counter < constant`` (TPU); else None."""
  known = _TRIP_COUNT.search(while_line)
  if known:
    return int(known.group(1))
  bound = next((m.group(1) for m in map(_BOUND.match, condition) if m), None)
  constants = dict(m.groups() for m in map(_CONSTANT.match, condition) if m)
  return int(constants[bound]) if bound in constants else None


def kernel_counts(hlo_text: str, group: Callable[[str], str] | None = None) -> dict:
  """Per call of the compiled module: ``ops`` (executed instructions that run a kernel),
  ``fusions`` (of those, fusions) and ``unknown_trip_counts`` (while loops whose trip count was
  not found and whose body was counted once: the counts are then a lower bound). With ``group``
  (the JAX op path an instruction came from, its ``op_name``, "" if none -> a label), also
  ``fusions_by_group``: the executed fusions per label, most first.

  A while loop's body counts once per iteration (``_trip_count``; its condition's compare is not
  counted); a called computation counts once; a conditional counts its largest branch; a fusion
  counts as one op however many instructions it fuses.
  """
  computations, entry = _computations(hlo_text)
  memo: dict[str, tuple[int, int, int, collections.Counter]] = {}

  def count(name: str) -> tuple[int, int, int, collections.Counter]:
    if name in memo:
      return memo[name]
    ops = fusions = unknown = 0
    by_group = collections.Counter()

    def add(counted, times=1):
      nonlocal ops, fusions, unknown
      ops, fusions, unknown = (ops + times * counted[0], fusions + times * counted[1],
                               unknown + times * counted[2])
      by_group.update({label: times * n for label, n in counted[3].items()})

    for line in computations[name]:
      match = _INSTRUCTION.match(line)
      if not match or match.group(1) in FREE_OPCODES or match.group(1).endswith("-done"):
        continue
      opcode = match.group(1)
      if opcode == "while":
        condition, body = _WHILE.search(line).groups()
        trips = _trip_count(line, computations[condition])
        add(count(body), trips or 1)
        unknown += trips is None
      elif opcode == "call":
        add(count(_CALLED.search(line).group(1)))
      elif opcode == "conditional":
        branches = _BRANCHES.search(line)
        callees = (re.findall(r"%([^\s,]+)", branches.group(1)) if branches
                   else _CALLED.findall(line))
        add(max((count(callee) for callee in callees), key=lambda c: c[0]))
      else:
        ops += 1
        fusions += opcode == "fusion"
        if group is not None and opcode == "fusion":
          op_name = _OP_NAME.search(line)
          by_group[group(op_name.group(1) if op_name else "")] += 1
    memo[name] = (ops, fusions, unknown, by_group)
    return memo[name]

  ops, fusions, unknown, by_group = count(entry)
  counts = {"ops": ops, "fusions": fusions, "unknown_trip_counts": unknown}
  if group is not None:
    counts["fusions_by_group"] = dict(by_group.most_common())
  return counts
