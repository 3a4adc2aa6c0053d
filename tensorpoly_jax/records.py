"""Result records: each run of a grid (a sweep point, an adapted task x seed) writes its outcome
to its own JSON file when it ends, so an interrupted or partly failed grid keeps every finished
run, a rerun of the same command redoes only what did not finish, and the grid's summary is
rebuilt from the records."""
from __future__ import annotations

import json
from typing import Callable

from tensorpoly_jax import paths
from tensorpoly_jax.trainer import Preempted, TrainingDiverged

FINISHED, DIVERGED, FAILED = "finished", "diverged", "failed"


class RunsFailed(RuntimeError):
  """Runs of a grid failed; each one's record holds its error, and every other run finished."""


def run_once(path: str, settings: dict, compute: Callable[[], dict]) -> dict:
  """The record at ``path`` when it was written for the same ``settings`` and did not fail, else
  ``compute()``'s fields with status ``finished``, or the error that stopped it (status
  ``diverged`` or ``failed``, message under ``error``), written to ``path`` and returned.

  A divergence recurs with the same settings, so its record is kept; any other failure (a lost
  host, a full disk) may not, so it runs again. A preemption is no outcome: the run resumes from
  its checkpoint when the command runs again, so ``Preempted`` propagates."""
  settings = json.loads(json.dumps(settings))  # tuples become lists, as a record reads back
  target = paths.resolve(path)
  saved = json.loads(target.read_text()) if target.exists() else None
  if saved and saved["status"] != FAILED and {k: saved.get(k) for k in settings} == settings:
    return saved
  try:
    outcome = {"status": FINISHED, **compute()}
  except Preempted:
    raise
  except TrainingDiverged as err:
    outcome = {"status": DIVERGED, "error": str(err)}
  except Exception as err:  # recorded, and the grid goes on; the command fails at its end
    outcome = {"status": FAILED, "error": f"{type(err).__name__}: {err}"}
  record = {**settings, **outcome}
  paths.write_json(path, record)
  return record


def raise_unfinished(unfinished: dict[str, dict]) -> None:
  """Raises naming every run (name -> record) that did not finish: TrainingDiverged when they all
  diverged (a sweep counts such a point as diverged), else RunsFailed."""
  if not unfinished:
    return
  lines = "".join(f"\n  {name}: {record['status']}: {record['error']}"
                  for name, record in unfinished.items())
  diverged = all(record["status"] == DIVERGED for record in unfinished.values())
  raise (TrainingDiverged if diverged else RunsFailed)(
      f"{len(unfinished)} run(s) did not finish; every other run kept its result. Each one's"
      " record holds its error: run the same command again to redo the failed ones (a diverged"
      f" one diverges again with the same settings).{lines}")
