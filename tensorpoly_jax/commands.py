"""What each ``tensorpoly`` command does, as plain functions of their settings (cli binds them
with gin). Results go to JSON files in the model directory."""
from __future__ import annotations

import json
import os

import numpy as np

from tensorpoly_jax import (adaptation, aot, checkpoints, console, decoding, evaluation,
                            inference, partitioning, paths, peft_bridge, pipeline, records)
from tensorpoly_jax import merge as merging
from tensorpoly_jax.data import check, choices, fewshot, tasks
from tensorpoly_jax.methods import AdapterConfig
from tensorpoly_jax.t5 import convert as t5_convert
from tensorpoly_jax.t5 import layout
from tensorpoly_jax.t5.model import EncoderDecoder, RunOptions, T5Config, preset
from tensorpoly_jax.trainer import TrainConfig

SUITES = ("embedded", "t0", "files")


def model_config(preset_name: str = "tiny", dtype: str = "float32", remat: str = "none",
                 dropout_rate: float = 0.0, scan_layers: bool | None = None) -> T5Config:
  """A backbone from a preset (for training one from scratch, or compiling a step)."""
  config = preset(preset_name)
  return RunOptions(dtype, remat, dropout_rate, scan_layers).apply(config)


def data_setup(suite: str = "embedded", seed: int = 0, data_dir: str | None = None,
               vocabulary_dir: str | None = None, examples_per_task: int | None = None,
               protocol=None, manifest: str | None = None,
               task_module: str | None = None) -> dict[str, int]:
  """Registers the tasks a run reads; returns the training mixture's routing id map.

  ``protocol`` (a ``t0.Protocol``) sets how the T0 suite departs from T-Few's protocol.
  ``manifest`` names the files suite's training and held-out tasks (default
  ``DATA_DIR/manifest.json``). ``task_module`` (a module name or a ``.py`` path) is imported
  first, for any suite: its import registers the user's own seqio tasks and mixtures."""
  from tensorpoly_jax.data import files

  if task_module is not None:
    files.import_task_module(task_module)
  if suite == "files":
    return files.register_files(data_dir, manifest, vocabulary_dir)
  if suite == "embedded":
    return tasks.register_embedded(seed)
  if suite == "t0":
    from tensorpoly_jax.data import t0

    if vocabulary_dir is None:
      raise ValueError("suite='t0' needs VOCABULARY_DIR: the checkpoint folder with spiece.model.")
    vocabulary = tasks.sentencepiece_vocabulary(os.path.join(vocabulary_dir, "spiece.model"))
    return t0.register_t0(vocabulary, data_dir, examples_per_task=examples_per_task,
                          protocol=protocol or t0.Protocol())
  raise ValueError(f"data suite {suite!r} is unknown; choose one of {SUITES}.")


def check_data(routing_ids: dict[str, int], mixture: str, heldout,
               targets_length: int | None = None) -> int:
  """Prints what each task of the training mixture and each held-out task reads; 1 when a task
  cannot be used, else 0. Held-out answer choices longer than ``targets_length`` are warned of."""
  training, held = task_list(mixture), task_list(heldout)
  print(f"training mixture {mixture!r}: {len(training)} tasks; routing id map of"
        f" {len(routing_ids)} tasks")
  unusable = []
  for names, heldout_role in ((training, False), (held, True)):
    for name in names:
      report = check.report_task(name, heldout_role, targets_length)
      print(check.format_report(report, verbose=heldout_role), flush=True)
      if report.problems:
        unusable.append(name)
  if unusable:
    print(f"{len(unusable)} task(s) cannot be used: {', '.join(unusable)}")
    return 1
  print(f"all {len(training)} training and {len(held)} held-out tasks are usable")
  return 0


def train(model_dir: str, mixture: str, train_config: TrainConfig,
          adapter: AdapterConfig | None = None, backbone_dir: str | None = None,
          model: T5Config | None = None, options: RunOptions | None = None) -> str:
  """With an adapter: multi-task adapter pretraining on ``backbone_dir`` (exported to
  ``model_dir/adapter``). Without: trains the backbone ``model`` itself (``model_dir/backbone``)."""
  if adapter is None:
    return pipeline.train_backbone(model_dir, model or model_config(), mixture, train_config)
  if backbone_dir is None:
    raise ValueError("adapter training needs BACKBONE_DIR (a `tensorpoly convert` output or a"
                     " trained backbone).")
  backbone = pipeline.load_backbone(backbone_dir, options or RunOptions(),
                                    train_config.make_mesh())
  _, export = pipeline.pretrain_adapters(model_dir, backbone, adapter, mixture, train_config)
  return export


def task_list(names) -> list[str]:
  """Task names, with mixtures expanded to their tasks (each task once, in order)."""
  names = [names] if isinstance(names, str) else list(names)
  return list(dict.fromkeys(task for name in names for task in tasks.mixture_task_names(name)))


def check_heldout(heldout, shots: int | None, seeds=(0,)) -> list[str]:
  """The held-out task names, each checked for a few-shot k its pool can give, and the few-shot
  seeds, before any work."""
  if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise ValueError(f"SEEDS={seeds!r} must be a non-empty tuple of ints, e.g."
                     " --gin.SEEDS='(0, 1, 32, 42, 1024)'.")
  names = task_list(heldout)
  for task in names:
    k = fewshot.num_shots(task, shots)
    fewshot.sample_indices(tasks.task_info(task).num_examples(tasks.POOL_SPLIT), k, 0)
  return names


def adapt(model_dir: str, backbone_dir: str, adapter_dir: str, heldout, train_config: TrainConfig,
          shots: int | None = None, seeds=(0, 1, 32, 42, 1024), options: RunOptions | None = None,
          length_normalize: bool = True, eval_batch_size: int = 32,
          eval_split: str = "validation", mode: str = "full", arrow_top_k: int = 4) -> dict:
  """Adaptation of every held-out task for every seed in ``mode`` (``adaptation``: few-shot
  training of the adapter or of a router row, or zero-shot routing), then its ``eval_split``; the
  backbone is loaded onto the mesh once and shared by every task x seed. ``shots=None`` gives
  each task its suite's k (T-Few's per-task k on T0).

  Writes ``model_dir/adapt_results.json`` from every run's record (``pipeline.adapt_heldout``):
  accuracy per task and seed, seed summaries, the exports that serve every adapted task at once
  (modes other than ``full``), and the runs that did not finish, which it then raises naming
  (``records.raise_unfinished``); a rerun redoes only those."""
  adaptation.check_mode(mode)  # the method is checked once the pretrained export is read
  names = check_heldout(heldout, shots, seeds)
  backbone = pipeline.load_backbone(backbone_dir, options or RunOptions(),
                                    train_config.make_mesh())
  results = pipeline.adapt_heldout(model_dir, backbone, adapter_dir, names, shots, seeds,
                                   train_config, eval_batch_size, length_normalize, eval_split,
                                   mode, arrow_top_k)
  summary = {task: evaluation.summarize(list(by_seed.values()))
             for task, by_seed in results.accuracy.items()}
  medians = [s["median"] for s in summary.values()]
  payload = {"split": eval_split, "shots": results.shots, "accuracy": results.accuracy,
             "summary": summary, "mean_of_medians": float(np.mean(medians)) if medians else None,
             "adaptation_params": results.adaptation_params, "unfinished": results.unfinished,
             "adapt_mode": mode, "exports": results.exports,
             "identity": {**results.identity, "train": train_config.identity()}}
  paths.write_json(os.path.join(model_dir, "adapt_results.json"), payload)
  records.raise_unfinished(results.unfinished)
  return payload


def pipeline_run(model_dir: str, backbone_dir: str, adapter: AdapterConfig, mixture: str,
                 heldout, pretrain_config: TrainConfig, adapt_config: TrainConfig,
                 shots: int | None = None, seeds=(0, 1, 32), options: RunOptions | None = None,
                 eval_split: str = "validation", selection_split: str | None = "validation") -> dict:
  """Adapter pretraining, then few-shot adaptation and evaluation of the held-out tasks: one sweep
  point, which chooses settings on ``selection_split``, or the report of a chosen point on
  ``eval_split``. A suite with no selection split (T0) refuses before any work."""
  if selection_split is None:
    raise ValueError(
        "this data suite has no split to choose settings on (SELECTION_SPLIT = None): T0's"
        " held-out tasks report on their evaluation split and their few-shot pools are their"
        " training data, so a sweep, or the report of a swept point, would choose on the reported"
        " split. Fix the settings in advance and run runs/pretrain.gin, then runs/adapt.gin (the"
        " T-Few protocol), or sweep on a suite that has a selection split.")
  check_heldout(heldout, shots, seeds)
  adapter_dir = train(model_dir, mixture, pretrain_config, adapter, backbone_dir, options=options)
  return adapt(model_dir, backbone_dir, adapter_dir, heldout, adapt_config, shots, seeds, options,
               eval_split=eval_split)


def evaluate(model_dir: str, backbone_dir: str, heldout, adapter_dir: str | None = None,
             split: str = "validation", inputs_length: int = 256, targets_length: int = 256,
             length_normalize: bool = True, batch_size: int = 32,
             options: RunOptions | None = None, model_parallel: int = 1, seed: int = 0) -> dict:
  """Rank-classification accuracy of a backbone, optionally with an exported adapter (an adapted
  one routes with the task id saved beside it and draws each example's template with its
  few-shot seed, as its adaptation run did), with the params placed on the mesh once.
  Writes ``model_dir/eval_results.json``."""
  backbone = pipeline.load_backbone(backbone_dir, options or RunOptions(),
                                    partitioning.make_mesh(model_parallel))
  config, params, meta = pipeline.with_adapter(backbone, adapter_dir)
  seed = meta.get("seed", seed)
  scorer = evaluation.Scorer(EncoderDecoder(config), backbone.mesh, length_normalize)
  results, predictions, names = {}, [], task_list(heldout)
  width = choices.choice_width(names, split, inputs_length, targets_length)  # one compile
  for task in names:
    evaluated = pipeline.evaluate_task(scorer, params, task, routing_id(config, meta, task),
                                       inputs_length, targets_length, split, batch_size, seed,
                                       width)
    results[task] = evaluated.accuracy
    predictions += evaluated.lines(task)
    console.say(f"eval {task}: accuracy {results[task]:.4f} on {split}")
  paths.atomic_write(os.path.join(model_dir, EVAL_PREDICTIONS),
                     "".join(json.dumps(line) + "\n" for line in predictions))
  paths.write_json(os.path.join(model_dir, "eval_results.json"),
                   {"split": split, "accuracy": results, "predictions": EVAL_PREDICTIONS,
                    "identity": pipeline.results_identity(backbone, adapter_dir)})
  return results


EVAL_PREDICTIONS = "eval_predictions.jsonl"


def routing_id(config: T5Config, meta: dict, task: str) -> int | None:
  """The task id ``task`` is routed with: an adapted export's own task's, else the task's id in
  the export's routing map (a multi-task export serves each of its tasks), else none."""
  if config.adapter is None or not config.adapter.routes_by_task:
    return None
  if meta.get("task_id") is not None:
    return meta["task_id"]
  return meta.get("routing_ids", {}).get(task)


def infer(backbone_dir: str, input_file: str, output_file: str, adapter_dir: str | None = None,
          vocabulary_dir: str | None = None,
          decode_config: decoding.DecodeConfig = decoding.DecodeConfig(), batch_size: int = 32,
          inputs_length: int = 512, length_normalize: bool = True,
          options: RunOptions | None = None, model_parallel: int = 1) -> int:
  """Answers the JSONL requests of ``input_file`` into ``output_file`` (``inference``): text
  generation, or rank classification where a request gives choices, each request routed by its
  own task. Resumes a partly written ``output_file``. Returns the number answered now."""
  for name, path in (("--input_file", input_file), ("--backbone_dir", backbone_dir)):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{name}={path} does not exist.")
  backbone = pipeline.load_backbone(backbone_dir, options or RunOptions(),
                                    partitioning.make_mesh(model_parallel))
  config, params, meta = pipeline.with_adapter(backbone, adapter_dir)
  routed = config.adapter is not None and config.adapter.routes_by_task
  routing = inference.TaskRouting(meta.get("routing_ids", {}),
                                  config.adapter.n_tasks if routed else 0, meta.get("task_id"))
  if vocabulary_dir is not None and not os.path.isfile(
      os.path.join(vocabulary_dir, t5_convert.VOCABULARY_FILE)):
    raise FileNotFoundError(f"--vocabulary_dir={vocabulary_dir} has no"
                            f" {t5_convert.VOCABULARY_FILE}.")
  vocabulary = inference.find_vocabulary((vocabulary_dir, backbone_dir,
                                          t5_convert.stored_source(backbone_dir)))
  server = inference.Server(EncoderDecoder(config), params, backbone.mesh, decode_config,
                            batch_size, inputs_length, length_normalize)
  answered = inference.serve_file(server, input_file, output_file, vocabulary, routing)
  console.say(f"infer: wrote {output_file} ({answered} request(s) answered now)")
  return answered


def convert(checkpoint_dir: str, output_dir: str, dtype: str = "float32",
            allow_pickle: bool = False, scan_layers: bool = False) -> None:
  import ml_dtypes

  numpy_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  source = checkpoint_dir  # as the user named it: a hub id or a folder
  checkpoint_dir = t5_convert.checkpoint_folder(checkpoint_dir, allow_pickle)
  with console.Progress(None, "converting", unit="tensor") as progress:
    config, params = t5_convert.load_hf_checkpoint(checkpoint_dir, allow_pickle, numpy_dtype,
                                                   progress=lambda name: progress.advance())
    progress.report()
  if scan_layers:  # stored as scanned runs read it: no layout change at every load
    config, params = config.replace(scan_layers=True), layout.stack_layers(params)
  t5_convert.save_converted(output_dir, config, params, source=source)
  written = [t5_convert.CONVERTED_CONFIG, f"{t5_convert.CONVERTED_PARAMS}/"]
  vocabulary = os.path.join(checkpoint_dir, t5_convert.VOCABULARY_FILE)
  if os.path.isfile(vocabulary):  # `tensorpoly infer` encodes text requests with it
    with open(vocabulary, "rb") as f:
      paths.atomic_write(os.path.join(output_dir, t5_convert.VOCABULARY_FILE), f.read())
    written.append(t5_convert.VOCABULARY_FILE)
  print(f"wrote {output_dir} ({', '.join(written)})")


def export_peft(adapter_dir: str, output_dir: str, task_id: int | None = None,
                base_model: str | None = None) -> None:
  """An adapter export -> a PEFT adapter folder (``PeftModel.from_pretrained`` loads it)."""
  written = peft_bridge.export(adapter_dir, output_dir, task_id, base_model)
  print(f"wrote {written} ({peft_bridge.PEFT_CONFIG}, {peft_bridge.PEFT_WEIGHTS})")


def import_peft(peft_dir: str, backbone_dir: str, output_dir: str,
                check_base_model: bool = True) -> None:
  """A PEFT LoRA / Poly adapter of Hugging Face T5 -> an adapter export for the converted backbone."""
  written = peft_bridge.import_(peft_dir, backbone_dir, output_dir, check_base_model)
  print(f"wrote {written} ({checkpoints.ADAPTER_META}, {checkpoints.ADAPTER_FILE})")


def merge(backbone_dir: str, adapter_dir: str, output_dir: str, task_id: int | None = None,
          output_format: str = "converted") -> None:
  """One task's adapter folded into the backbone: a converted backbone, or (``hf``) a Hugging
  Face T5 checkpoint that ``T5ForConditionalGeneration.from_pretrained`` loads."""
  merged = merging.merge(backbone_dir, adapter_dir, output_dir, task_id, output_format)
  print(f"wrote {output_dir} ({', '.join(merged.files)}): task {merged.task_id} of {adapter_dir}"
        f" folded into {backbone_dir}")


def compile_step(stage: str, topology: str, model: T5Config, adapter: AdapterConfig | None,
                 shapes: aot.StepShapes, optimizer=None, json_path: str | None = None) -> dict:
  """Ahead-of-time compile of one stage's step for ``topology``; prints the report, writes it to
  ``json_path``, and raises ``aot.DoesNotFit`` (after writing) when it needs more than the HBM."""
  report = aot.compile_stage(stage, model.replace(adapter=adapter), shapes, topology,
                             shapes.train_config(optimizer))
  print(aot.format_report(report))
  if json_path:
    paths.write_json(json_path, report)
  if report["fits"] is False:
    raise aot.DoesNotFit(aot.advice(report), report)
  return report
