"""`tensorpoly merge`: one task's adapter folded into the backbone, ``W + A B / r`` for every
adapted projection (``W: [d_in, d_out]``, ``A: [d_in, r]`` and ``B: [r, d_out]`` as the task's
routing builds them), written as a converted backbone or a Hugging Face T5 checkpoint.

The merged model has no adapter: it computes what the adapted model computes for that task, at
the plain backbone's cost, and anything that reads a T5 loads it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from flax import traverse_util

from tensorpoly_jax import checkpoints, fingerprint, paths, peft_bridge, pipeline
from tensorpoly_jax.methods import AdapterConfig, from_dict
from tensorpoly_jax.t5 import convert, layout

FORMATS = ("converted", "hf")


@dataclasses.dataclass(frozen=True)
class Merged:
  """What ``merge`` wrote: the task it folded in, and the folder's files."""

  task_id: int
  files: tuple[str, ...]


def merge_task(adapter: AdapterConfig, meta: dict, task_id: int | None) -> int:
  """The task to fold in: ``task_id``, else an adapted export's own; a multi-task routed export
  needs one."""
  task_id = peft_bridge.export_task(adapter, meta, task_id)
  if task_id is None:
    raise peft_bridge.TaskIdError(
        f"the adapter export routes {adapter.n_tasks} tasks ({adapter.method}); a merged model"
        f" computes one: pass --task_id=N (0 <= N < {adapter.n_tasks}, the ids in its"
        " adapter_config.json's routing_ids), or merge an adapted export (`tensorpoly adapt`),"
        " which knows its task.")
  return task_id


def merged_params(params, adapter_params, meta: dict, task_id: int) -> dict:
  """Per-layer backbone ``params`` with ``A B / r`` of ``task_id`` added to every adapted kernel,
  in float32 and stored in the kernel's dtype. Refuses an adapter of other shapes."""
  adapter = from_dict(meta["adapter"])
  loras = peft_bridge.task_loras(adapter, adapter_params, peft_bridge.exported_shapes(meta), task_id)
  flat = traverse_util.flatten_dict(params)
  for module, (lora_a, lora_b) in loras.items():
    kernel = flat.get((*module, "kernel"))
    delta = lora_a @ lora_b / lora_a.shape[-1]  # the 1 / r that low_rank_delta applies
    if kernel is None or kernel.shape != delta.shape:
      shape = "no such projection" if kernel is None else f"a kernel of {kernel.shape}"
      raise checkpoints.CheckpointMismatchError(
          f"the adapter changes {'/'.join(module)} by a {delta.shape} delta, but the backbone has"
          f" {shape}: the adapter was trained on another base model.")
    flat[(*module, "kernel")] = (np.asarray(kernel, np.float32) + delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def merge(backbone_dir: str, adapter_dir: str, output_dir: str, task_id: int | None = None,
          output_format: str = "converted") -> Merged:
  """Writes ``adapter_dir``'s task folded into ``backbone_dir`` to ``output_dir``: a converted
  backbone in the source's layout (``converted``), or ``config.json`` and ``model.safetensors``
  for ``T5ForConditionalGeneration`` (``hf``); ``spiece.model`` is copied where there is one."""
  if output_format not in FORMATS:
    raise ValueError(f"--format={output_format!r} is unknown; choose one of {FORMATS}.")
  output = paths.resolve(output_dir)
  if output.exists() and any(output.iterdir()):
    raise ValueError(f"--output_dir={output_dir} is not empty; merge writes a new folder"
                     " (and never over a backbone): remove it or choose another.")
  adapter_params, meta = checkpoints.load_adapter(adapter_dir)
  task_id = merge_task(from_dict(meta["adapter"]), meta, task_id)
  config, params = convert.load_converted(backbone_dir)
  pipeline.check_fingerprint(
      meta, convert.stored_fingerprint(backbone_dir) or fingerprint.params_fingerprint(params),
      adapter_dir)
  merged = merged_params(layout.to_layout(params, scanned=False), adapter_params, meta, task_id)
  vocabulary = paths.resolve(backbone_dir) / convert.VOCABULARY_FILE
  extra = {convert.VOCABULARY_FILE: vocabulary.read_bytes()} if vocabulary.exists() else {}
  if output_format == "hf":
    files = {**convert.hf_checkpoint_files(config, merged), **extra}
    paths.write_folder(output_dir, files)
    return Merged(task_id, tuple(files))
  source = f"tensorpoly merge of {adapter_dir} (task {task_id}) into {backbone_dir}"
  return Merged(task_id, _write_converted(output_dir, config, merged, source, extra))


def _write_converted(output_dir: str, config, params, source: str, extra: dict[str, bytes]
                     ) -> tuple[str, ...]:
  """``save_converted`` in the layout ``config`` records, plus the ``extra`` files."""
  convert.save_converted(output_dir, config, layout.to_layout(params, config.scan_layers), source)
  for name, data in extra.items():
    paths.atomic_write(paths.resolve(output_dir) / name, data)
  return (convert.CONVERTED_CONFIG, f"{convert.CONVERTED_PARAMS}/", convert.CONVERTED_FINGERPRINT,
          convert.CONVERTED_SOURCE, *extra)
