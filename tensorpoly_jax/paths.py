"""Model directories on a local disk or a remote filesystem (``gs://bucket/run``), through
``etils.epath`` as orbax does: ``os.path.abspath('gs://b/run')`` would silently make a local
folder named ``gs:``, so every path a run writes goes through here.

Every file a run writes is written here, by process 0 only (the other processes of a multi-host
run compute the same values), under a temporary name in its folder and then renamed into place:
a reader, or a run killed midway, sees the older file or the newer one, never half of one."""
from __future__ import annotations

import importlib.util
import io
import json
import os

import jax
from etils import epath


def is_remote(path) -> bool:
  return "://" in str(path)


def resolve(path) -> epath.Path:
  """An absolute local path, or the remote URI as epath's filesystem for its scheme sees it."""
  if not is_remote(path):
    return epath.Path(os.path.abspath(path))
  try:
    return epath.Path(str(path))
  except KeyError:
    scheme = str(path).split("://", 1)[0]
    raise ValueError(f"model_dir {str(path)!r}: no filesystem serves {scheme}:// here; use a local"
                     " folder or gs:// (orbax and etils.epath read and write it).") from None


def _temporary(target: epath.Path, kind: str) -> epath.Path:
  """A hidden sibling of ``target``: the same folder is the same filesystem, where a rename is
  atomic. The name is fixed, so a write killed midway leaves one leftover that the next write
  reuses, not one per kill."""
  return target.parent / f".{target.name}.{kind}"


def atomic_write(path, data: str | bytes) -> None:
  """Writes ``data`` to ``path`` from process 0: into a temporary sibling, then renamed over any
  older file."""
  if jax.process_index() != 0:
    return
  target = resolve(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  temporary = _temporary(target, "tmp")
  temporary.write_bytes(_bytes(data))
  temporary.replace(target)


def _bytes(data: str | bytes) -> bytes:
  return data.encode() if isinstance(data, str) else data


def write_json(path, payload) -> None:
  atomic_write(path, json.dumps(payload, indent=2))


def write_figure(path, figure) -> None:
  """A matplotlib figure as a PNG: drawn into memory, then written as one file."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  atomic_write(path, buffer.getvalue())


def write_folder(path, files: dict[str, str | bytes]) -> None:
  """Writes ``files`` (name -> contents) as the folder ``path`` from process 0, all of them into a
  temporary sibling folder that then takes the place of any older ``path``: a reader never sees
  new weights beside an old config, and a run killed midway leaves the older folder whole.

  Between the two renames the older folder waits under a hidden name (a reader finds no folder
  for that instant, never a mixed one); a write killed right there is repaired by the next.
  On an object store a rename is a copy: the same order keeps the older folder until the new one
  is complete."""
  if jax.process_index() != 0:
    return
  target = resolve(path)
  temporary, older = _temporary(target, "tmp"), _temporary(target, "replaced")
  if older.exists():  # a write killed between its renames: its older folder is whole
    if target.exists():
      older.rmtree()
    else:
      older.rename(target)
  if temporary.exists():
    temporary.rmtree()
  temporary.mkdir(parents=True)
  for name, data in files.items():
    (temporary / name).write_bytes(_bytes(data))
  replacing = target.exists()
  if replacing:
    target.rename(older)
  temporary.rename(target)
  if replacing:
    older.rmtree()


def open_append(path):
  """An append-only log (``metrics.jsonl``), for its one writer on process 0: a log grows line by
  line, so it is flushed per line instead of renamed; a reader sees every whole line so far."""
  return resolve(path).open("a")


# Client libraries that orbax (bucket metadata) and tensorboardX need for a scheme.
CLIENTS = {"gs": ("google.cloud.storage", "google-cloud-storage")}


def _has_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def check_writable(model_dir) -> None:
  """Fails before any work when ``model_dir`` cannot hold checkpoints."""
  path = resolve(model_dir)
  scheme = str(model_dir).split("://", 1)[0] if is_remote(model_dir) else None
  if scheme in CLIENTS and not _has_module(CLIENTS[scheme][0]):
    raise ValueError(f"model_dir {str(model_dir)!r}: checkpoints and TensorBoard on {scheme}:// need"
                     f" {CLIENTS[scheme][1]}: pip install 'tensorpoly-jax[gcs]'.")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe.{os.getpid()}.{os.urandom(4).hex()}"  # one per process
    probe.write_text("ok")
    probe.unlink()
  except Exception as err:  # OSError locally; the remote filesystems raise their own types
    hint = (f"the {str(model_dir).split('://', 1)[0]}:// filesystem is not reachable from here"
            " (credentials, network, or its client library)" if is_remote(model_dir)
            else "choose another --model_dir")
    raise ValueError(f"model_dir {str(model_dir)!r} is not writable ({type(err).__name__}:"
                     f" {err}); {hint}.") from err
