"""The tuning protocol's routing-modes stage: each method at the point the protocol chose for it
(``embedded_protocol``'s stage 2), adapted in every ``ADAPT_MODE`` with each mode's own setting
chosen on validation, and reported on test at every k over independent replicates.

- Replicates: replicate r trains the backbone and every method's pretraining with seed r
  (replicate 0 is the demo's own run), so each row's cells span backbone and pretraining seeds,
  not only few-shot seeds. The bootstrap resamples the pooled cells as independent; cells of one
  replicate share its backbone, so the intervals do not account for that clustering (with two
  replicates, resampling replicates would say little).
- Selection, on replicate 0's validation split at the demo's k with its few-shot seeds, by the
  protocol's criterion (mean over tasks of the median over seeds): ``router`` and ``router_mu``
  choose ``ROUTER_LR`` among ``Stage.router_rates`` (the rate of the only weights they train, as
  the protocol chose full adaptation's among the rates of its trained weights); ``arrow`` chooses
  its top-k among ``Stage.arrow_top_k``; ``uniform`` and ``frozen_average`` have nothing to
  choose; ``full`` keeps the protocol's choice.
- Report, on every replicate's test split: the trained modes at every k of ``Stage.shots``, the
  zero-shot modes once, LoRA and TLoRA (no router) in ``full`` only. Accuracy is the mean over
  (replicate, task, few-shot seed) cells with a bootstrap 95% interval; each mode against
  ``full`` at the same k and each pair of methods under ``full`` are paired differences
  (``routing_modes``).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import statistics
from typing import NamedTuple

import routing_modes

SELECTION_SPLIT = "validation"
REPORT_SPLIT = "test"


@dataclasses.dataclass(frozen=True)
class Stage:
  """What the stage runs: each method at ``chosen[method]`` (``{"learning_rate",
  "pretrain_steps"}``), the demo's other settings but ``overrides`` (``DemoConfig`` fields: tests
  shrink the sizes), under ``work_dir``."""
  work_dir: str
  chosen: dict
  overrides: dict = dataclasses.field(default_factory=dict)
  replicates: tuple[int, ...] = (0, 1)
  shots: tuple[int, ...] = (4, 8, 16, 32)
  router_rates: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
  arrow_top_k: tuple[int, ...] = (1, 2, 4, 8)

  def config(self):
    """The demo's ``DemoConfig`` with each method at its chosen point, in ``chosen``'s order."""
    from tensorpoly_jax import cli, demo

    config = dataclasses.replace(cli.demo_config(), **self.overrides)
    return dataclasses.replace(config, methods={
        name: demo.Method(config.methods[name].adapter, float(point["learning_rate"]),
                          int(point["pretrain_steps"])) for name, point in self.chosen.items()})


class Job(NamedTuple):
  """One ``pipeline.adapt_heldout`` call: a method's export adapted to every held-out task for
  every few-shot seed."""
  replicate: int
  split: str
  method: str
  mode: str
  shots: int  # 0: a zero-shot mode
  router_learning_rate: float | None = None  # None: the demo's
  arrow_top_k: int = 0

  def folder(self, work_dir: str) -> str:
    setting = (f"_router_lr{self.router_learning_rate:g}" if self.router_learning_rate is not None
               else "") + (f"_top{self.arrow_top_k}" if self.mode == "arrow" else "")
    return os.path.join(replicate_dir(work_dir, self.replicate), self.split, self.method,
                        f"{self.mode}{setting}", f"k{self.shots}")


def replicate_dir(work_dir: str, replicate: int) -> str:
  """Where a replicate's backbone, pretrained exports and adaptation runs go."""
  return os.path.join(work_dir, f"replicate{replicate}")


_WORKER: dict = {}  # per process: the registered suite and each replicate's loaded backbone


def _setup(stage: Stage):
  from tensorpoly_jax.data import tasks

  if _WORKER.get("stage") != stage:
    config = stage.config()
    tasks.register_embedded(config.data_seed, config.sizes)
    _WORKER.update(stage=stage, config=config, backbones={},
                   heldout=tasks.mixture_task_names(tasks.EMBEDDED_HELDOUT))
  return _WORKER["config"], _WORKER["heldout"]


def _seeded(train, replicate: int):
  return dataclasses.replace(train, seed=replicate)


def prepare(stage: Stage, replicate: int) -> dict:
  """Trains (or reads back) the replicate's backbone and every method's pretrained export;
  returns the backbone's own test accuracy (``{task: accuracy}``)."""
  from tensorpoly_jax import demo, pipeline
  from tensorpoly_jax.data import tasks
  from tensorpoly_jax.t5.model import preset

  config, heldout = _setup(stage)
  root = replicate_dir(stage.work_dir, replicate)
  pipeline.train_backbone(os.path.join(root, "backbone"), preset("tiny"), tasks.EMBEDDED_TRAIN,
                          _seeded(config.train_config("backbone"), replicate))
  backbone = _backbone(stage, replicate)
  for name, method in config.methods.items():
    pipeline.pretrain_adapters(os.path.join(root, name), backbone, method.adapter,
                               tasks.EMBEDDED_TRAIN,
                               _seeded(config.train_config("pretrain", name), replicate))
  alone = demo.score_backbone(backbone, heldout, REPORT_SPLIT,
                              dict(inputs_length=config.inputs_length,
                                   targets_length=config.targets_length))
  return {task: seeds["-"] for task, seeds in alone["accuracy"].items()}


def _backbone(stage: Stage, replicate: int):
  from tensorpoly_jax import pipeline

  backbones = _WORKER["backbones"]
  if replicate not in backbones:
    backbones[replicate] = pipeline.load_backbone(
        os.path.join(replicate_dir(stage.work_dir, replicate), "backbone", "backbone"))
  return backbones[replicate]


def run_job(stage: Stage, job: Job) -> dict:
  """``job``'s accuracy (``{task: {seed: accuracy}}``) and its number of trained params per
  task; finished runs are read back."""
  from tensorpoly_jax import pipeline, records

  config, heldout = _setup(stage)
  train = config.train_config("adapt", job.method)
  if job.router_learning_rate is not None:
    train = dataclasses.replace(train, optimizer=dataclasses.replace(
        train.optimizer, router_learning_rate=job.router_learning_rate))
  adapter_dir = os.path.join(replicate_dir(stage.work_dir, job.replicate), job.method, "adapter")
  arrow = {"arrow_top_k": job.arrow_top_k} if job.mode == "arrow" else {}
  result = pipeline.adapt_heldout(
      job.folder(stage.work_dir), _backbone(stage, job.replicate), adapter_dir, heldout,
      job.shots or None, config.seeds, train, eval_split=job.split, mode=job.mode, **arrow)
  records.raise_unfinished(result.unfinished)  # a row needs every task x seed
  return {"accuracy": result.accuracy, "adaptation_params": result.adaptation_params}


def selection_jobs(stage: Stage, methods, demo_shots: int) -> list[Job]:
  """Every point of every routed method's mode settings, on the first replicate's validation
  split."""
  first = stage.replicates[0]
  return [job for method in methods for job in (
      *(Job(first, SELECTION_SPLIT, method, mode, demo_shots, router_learning_rate=rate)
        for mode in ("router", "router_mu") for rate in stage.router_rates),
      *(Job(first, SELECTION_SPLIT, method, "arrow", 0, arrow_top_k=k)
        for k in stage.arrow_top_k))]


def report_jobs(stage: Stage, config, settings: dict[tuple[str, str], dict]) -> list[Job]:
  """Every replicate's test runs: ``full`` for every method and the other modes of the routed
  ones with their chosen ``settings`` (``{(method, mode): Job fields}``); the trained modes at
  every k of ``stage.shots``."""
  from tensorpoly_jax import adaptation

  return [Job(replicate, REPORT_SPLIT, method, mode, k, **settings.get((method, mode), {}))
          for replicate in stage.replicates for method, method_settings in config.methods.items()
          for mode, k in routing_modes.adaptation_runs(method_settings.adapter.routed,
                                                       adaptation.MODES, stage.shots)]


def mean_of_medians(accuracy: dict[str, dict[str, float]]) -> float:
  """The protocol's selection criterion: the mean over tasks of the median over seeds."""
  return statistics.fmean(statistics.median(seeds.values()) for seeds in accuracy.values())


def choose_settings(selected: dict[Job, dict]) -> dict[tuple[str, str], dict]:
  """Each (method, mode)'s best setting by ``mean_of_medians``, as ``Job`` fields: the first in
  ``selected``'s order (grid order) on a tie; diverged points (``accuracy`` None) are never
  chosen."""
  best: dict[tuple[str, str], tuple[float, Job]] = {}
  for job, result in selected.items():
    if job.split != SELECTION_SPLIT:
      raise ValueError(f"{job.folder('')}: a setting is chosen on {SELECTION_SPLIT} only.")
    key = (job.method, job.mode)
    if result["accuracy"] is None:
      continue
    score = mean_of_medians(result["accuracy"])
    if key not in best or score > best[key][0]:
      best[key] = (score, job)
  unchosen = {(j.method, j.mode) for j in selected} - best.keys()
  if unchosen:
    raise RuntimeError(f"every setting of {sorted(unchosen)} diverged; lower ROUTER_LR.")
  return {key: ({"arrow_top_k": job.arrow_top_k} if job.mode == "arrow"
                else {"router_learning_rate": job.router_learning_rate})
          for key, (_, job) in best.items()}


def pooled_rows(reported: dict[Job, dict]) -> list[dict]:
  """One row per (method, mode, k) over every replicate: its cells keyed
  ``replicate<r>/<task>`` -> seed, so that paired comparisons pair the same replicate, task and
  seed."""
  rows: dict[tuple, dict] = {}
  for job, result in reported.items():
    row = rows.setdefault((job.method, job.mode, job.shots), {
        "method": job.method, "mode": job.mode, "shots": job.shots, "accuracy": {},
        "adaptation_params": result["adaptation_params"],
        "router_learning_rate": job.router_learning_rate, "arrow_top_k": job.arrow_top_k})
    row["accuracy"].update({f"replicate{job.replicate}/{task}": seeds
                            for task, seeds in result["accuracy"].items()})
  for row in rows.values():
    values = routing_modes.cells(row["accuracy"])
    row.update(mean=float(values.mean()), interval=routing_modes.bootstrap_interval(values))
  return list(rows.values())


def _run_all(pool, stage: Stage, jobs: list[Job], diverged_ok: bool = False) -> dict[Job, dict]:
  """Each job's result, in ``jobs``' order; with ``diverged_ok`` (a selection grid), a point whose
  every run diverged gives ``accuracy`` None instead of stopping the stage."""
  from tensorpoly_jax.trainer import TrainingDiverged

  futures = {pool.submit(run_job, stage, job): job for job in jobs}
  done = {}
  for number, future in enumerate(concurrent.futures.as_completed(futures), 1):
    job = futures[future]
    try:
      done[job] = future.result()
      score = f"{100 * mean_of_medians(done[job]['accuracy']):.1f}"
    except Exception as error:  # pylint: disable=broad-except
      if not (diverged_ok and isinstance(error, TrainingDiverged)):
        pool.shutdown(cancel_futures=True)  # not hours of queued runs before the error shows
        raise
      done[job], score = {"accuracy": None, "adaptation_params": None}, "diverged"
    print(f"  [{number}/{len(jobs)}] {job.folder('')}: {score}", flush=True)
  return {job: done[job] for job in jobs}


def run(stage: Stage, jobs: int) -> dict:
  """Runs ``stage``'s adaptations ``jobs`` at a time; returns its results' JSON payload."""
  config = stage.config()
  routed = [m for m, settings in config.methods.items() if settings.adapter.routed]
  # One job runs in this process; more run in processes of their own (jax does not survive fork).
  spawn = multiprocessing.get_context("spawn")
  pool = (concurrent.futures.ThreadPoolExecutor(1) if jobs == 1 else
          concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn))
  with pool:
    print("modes: backbones and pretrained exports", flush=True)
    prepared = {r: pool.submit(prepare, stage, r) for r in stage.replicates}
    backbone_alone = {r: future.result() for r, future in prepared.items()}
    print("modes: select each mode's setting (validation)", flush=True)
    selected = _run_all(pool, stage, selection_jobs(stage, routed, config.shots),
                        diverged_ok=True)
    settings = choose_settings(selected)
    print("modes: report (test)", flush=True)
    reported = _run_all(pool, stage, report_jobs(stage, config, settings))
  rows = pooled_rows(reported)
  return {
      "replicates": list(stage.replicates), "shots": list(stage.shots),
      "seeds": list(config.seeds), "demo_shots": config.shots,
      "router_rates": list(stage.router_rates), "arrow_top_k": list(stage.arrow_top_k),
      "chosen_points": stage.chosen,
      "selection": [{**job._asdict(), "accuracy": result["accuracy"],
                     "mean_of_medians": result["accuracy"] and mean_of_medians(result["accuracy"])}
                    for job, result in selected.items()],
      "chosen_settings": [{"method": m, "mode": mode, **s} for (m, mode), s in settings.items()],
      "backbone_alone": {"accuracy": {str(r): a for r, a in backbone_alone.items()},
                         "mean": statistics.fmean(value for accuracy in backbone_alone.values()
                                                  for value in accuracy.values())},
      "bootstrap_samples": routing_modes.BOOTSTRAP_SAMPLES,
      "rows": rows, "differences": routing_modes.differences(rows, config.shots),
      "method_differences": routing_modes.method_differences(rows)}


def report(modes: dict, stem: str) -> None:
  """Prints the stage's tables and draws ``<stem>_params.png`` and ``<stem>_shots.png``."""
  print("each mode's setting chosen on validation (replicate 0, k ="
        f" {modes['demo_shots']}):")
  for chosen in modes["chosen_settings"]:
    setting = (f"ROUTER_LR={chosen['router_learning_rate']:g}" if "router_learning_rate" in chosen
               else f"ARROW_TOP_K={chosen['arrow_top_k']}")
    print(f"  {chosen['method']} {chosen['mode']}: {setting}")
  print(f"backbone alone: {100 * modes['backbone_alone']['mean']:.1f}")
  routing_modes.print_tables(modes["rows"], modes["differences"], modes["method_differences"])
  routing_modes.plot(modes["rows"], modes["demo_shots"],
                     f"embedded suite, {len(modes['replicates'])} replicates",
                     f"{stem}_params.png", f"{stem}_shots.png")
