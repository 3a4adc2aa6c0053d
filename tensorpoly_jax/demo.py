"""``tensorpoly demo``: the paper's pipeline in miniature on the embedded mini-T0 suite.

A tiny T5 is trained on the training tasks (the stand-in for T0), then every method gets
multi-task adapter pretraining, few-shot adaptation on each held-out task for several seeds (new
router row, T-Few losses) and rank-classification evaluation. ``evaluation.json`` holds every
accuracy; the Table-1-style report (terminal, ``report.json``, ``report.png``) is computed from it.
The settings are gin: ``configs/runs/demo.gin``, and ``runs/demo_quick.gin`` for a smoke run.
"""
from __future__ import annotations

import dataclasses
import os
import time

from tensorpoly_jax import console, evaluation, paths, pipeline, records
from tensorpoly_jax.data import choices, embedded, tasks
from tensorpoly_jax.methods import AdapterConfig
from tensorpoly_jax.optimizers import OptimizerConfig
from tensorpoly_jax.reporting import write_report
from tensorpoly_jax.t5.model import EncoderDecoder, preset
from tensorpoly_jax.trainer import TrainConfig

EVALUATION_FILE = "evaluation.json"


@dataclasses.dataclass(frozen=True)
class Method:
  """A method as the demo runs it: its adapter, and the settings ``benchmarks/embedded_protocol.py``
  chose for it on validation (a test checks them against its results JSON)."""

  adapter: AdapterConfig
  learning_rate: float  # its trained weights' peak rate (LoRA-named or leaves), in both stages
  pretrain_steps: int

  def to_dict(self) -> dict:
    return {"adapter": self.adapter.to_dict(), "learning_rate": self.learning_rate,
            "pretrain_steps": self.pretrain_steps}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """The demo's sizes and its methods, in report order."""

  methods: dict[str, Method]
  data_seed: int = 0
  sizes: embedded.Sizes = embedded.Sizes()
  backbone_steps: int = 2000
  pretrain_steps: int | None = None  # None: each method's own
  adapt_steps: int = 50
  batch_size: int = 32
  adapt_batch_size: int = 8
  shots: int = 16
  seeds: tuple[int, ...] = (0, 1, 32)
  inputs_length: int = 48
  targets_length: int = 24
  eval_split: str = "test"  # the report's split; settings are never chosen on it
  # Every stage's optimizer; its rates are set per stage: the backbone's, or the method's own.
  optimizer: OptimizerConfig = OptimizerConfig(name="adamw", router_learning_rate=0.1,
                                               warmup_fraction=0.06)
  backbone_learning_rate: float = 3e-3

  def to_dict(self) -> dict:
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {**fields, "sizes": dataclasses.asdict(self.sizes),
            "optimizer": dataclasses.asdict(self.optimizer),
            "methods": {name: method.to_dict() for name, method in self.methods.items()}}

  def train_config(self, stage: str, method: str | None = None) -> TrainConfig:
    """The backbone's settings, or ``method``'s own for its pretraining and adaptation."""
    if stage == "backbone":
      steps, rate = self.backbone_steps, self.backbone_learning_rate
    else:
      settings = self.methods[method]
      steps = {"pretrain": self.pretrain_steps or settings.pretrain_steps,
               "adapt": self.adapt_steps}[stage]
      rate = settings.learning_rate
    optimizer = dataclasses.replace(self.optimizer, learning_rate=rate,
                                    adapter_learning_rate=rate, leaf_learning_rate=rate)
    return TrainConfig(steps=steps, batch_size=self.adapt_batch_size if stage == "adapt" else
                       self.batch_size, inputs_length=self.inputs_length,
                       targets_length=self.targets_length, checkpoint_every=steps,
                       loss="tfew" if stage == "adapt" else "lm",
                       keep_checkpoints=1, log_every=max(1, steps // 10), optimizer=optimizer)


def run(model_dir: str, config: DemoConfig) -> dict:
  """Runs every stage (resuming finished ones from ``model_dir``) and writes the report."""
  started = time.time()
  tasks.register_embedded(config.data_seed, config.sizes)
  heldout = [tasks.embedded_heldout_task(t) for t in sorted(embedded.HELDOUT_TASKS)]
  length = dict(inputs_length=config.inputs_length, targets_length=config.targets_length)
  stages = len(config.methods) + 3  # the backbone, zero-shot, each method, the report
  stage = lambda number, what: console.say(f"demo stage {number}/{stages}: {what}")
  stage(1, f"train the backbone on the {len(tasks.mixture_task_names(tasks.EMBEDDED_TRAIN))}"
        " training tasks")
  backbone_dir = pipeline.train_backbone(os.path.join(model_dir, "backbone"), preset("tiny"),
                                         tasks.EMBEDDED_TRAIN, config.train_config("backbone"))
  backbone = pipeline.load_backbone(backbone_dir)  # once, for every method, task and seed
  stage(2, f"score the backbone alone on the {len(heldout)} held-out tasks (zero-shot)")
  results = {"zero_shot_backbone": score_backbone(backbone, heldout, config.eval_split, length)}
  for number, (name, method) in enumerate(config.methods.items(), 3):
    stage(number, f"{name}: multi-task pretraining, then {len(heldout)} held-out tasks x"
          f" {len(config.seeds)} seeds adapted and scored")
    method_dir = os.path.join(model_dir, name)
    _, adapter_dir = pipeline.pretrain_adapters(method_dir, backbone, method.adapter,
                                                tasks.EMBEDDED_TRAIN,
                                                config.train_config("pretrain", name))
    adapted = pipeline.adapt_heldout(method_dir, backbone, adapter_dir, heldout, config.shots,
                                     config.seeds, config.train_config("adapt", name),
                                     eval_split=config.eval_split)
    records.raise_unfinished(adapted.unfinished)  # the report needs every task x seed
    results[name] = dataclasses.asdict(adapted)
  stage(stages, "the report")
  evaluation = {"config": config.to_dict(), "results": results,
                "seconds": round(time.time() - started, 1)}
  paths.write_json(os.path.join(model_dir, EVALUATION_FILE), evaluation)
  return write_report(model_dir, evaluation)


def score_backbone(backbone: pipeline.Backbone, heldout, split: str, length):
  """The backbone alone, before any adaptation (a held-out task's name is new to it)."""
  scorer = evaluation.Scorer(EncoderDecoder(backbone.config), backbone.mesh)
  width = choices.choice_width(heldout, split, **length)  # one compile for every task
  accuracy = {t: {"-": pipeline.evaluate_task(scorer, backbone.params, t, None, split=split,
                                              choice_width=width, **length).accuracy}
              for t in heldout}
  return {"accuracy": accuracy, "adaptation_params": 0}
