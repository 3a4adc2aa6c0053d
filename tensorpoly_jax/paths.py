"""Model directories on a local disk or a remote filesystem (``gs://bucket/run``), through
``etils.epath`` as orbax does: ``os.path.abspath('gs://b/run')`` would silently make a local
folder named ``gs:``, so every path a run writes goes through here."""
from __future__ import annotations

import importlib.util
import os

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
    probe = path / ".write_probe"
    probe.write_text("ok")
    probe.unlink()
  except Exception as err:  # OSError locally; the remote filesystems raise their own types
    hint = (f"the {str(model_dir).split('://', 1)[0]}:// filesystem is not reachable from here"
            " (credentials, network, or its client library)" if is_remote(model_dir)
            else "choose another --model_dir")
    raise ValueError(f"model_dir {str(model_dir)!r} is not writable ({type(err).__name__}:"
                     f" {err}); {hint}.") from err
