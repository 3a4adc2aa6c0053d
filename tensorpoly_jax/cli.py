"""``tensorpoly`` command line: T5X-style ``--gin_file`` / ``--gin.NAME=value`` / ``--model_dir``.

The only module that parses gin and flags; every library object it binds is a plain dataclass
or function, registered here as a gin configurable.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys

import gin

from tensorpoly_jax import aot, commands, demo, distributed
from tensorpoly_jax import configurables  # noqa: F401 (registers the configs' gin names)
from tensorpoly_jax.data import embedded


def _configs_dir() -> str:
  """The gin files: inside an installed package, or the checkout's ``configs/`` (editable)."""
  here = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(here, "configs")
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), "configs")


CONFIGS = _configs_dir()  # also T5X's --gin_search_paths for configs/t5x/*.gin
# gin wraps the functions: the CLI calls these wrapped versions, which read the bindings.
CONFIGURED = {fn.__name__: gin.external_configurable(fn, module="tensorpoly_jax")
              for fn in (commands.data_setup, commands.train, commands.adapt, commands.evaluate,
                         commands.model_config, commands.pipeline_run, commands.compile_step)}
CONFIGURED["demo"] = gin.external_configurable(demo.run, "demo", module="tensorpoly_jax")
for _cls in (demo.DemoConfig, demo.Method, embedded.Sizes):  # runs/demo.gin's settings
  gin.external_configurable(_cls, module="tensorpoly_jax")
DEMO_GIN, DEMO_QUICK_GIN = "runs/demo.gin", "runs/demo_quick.gin"

GIN_FLAG = re.compile(r"--gin\.([A-Za-z_][\w./]*)=(.*)", re.S)


def parse_gin(gin_files, gin_flags, model_dir=None, search_paths=()) -> None:
  """Parses the files, then the flag bindings; a flag that names no macro the files define, or a
  parameter gin does not know, fails here, before any work."""
  gin.clear_config()
  roots = (*search_paths, CONFIGS, os.getcwd())
  for path in roots:  # for `include`s inside the files
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings([_find_gin_file(name, roots) for name in gin_files], [],
                                      finalize_config=False)
  bindings = [f"MODEL_DIR = {model_dir!r}"] if model_dir else []
  for flag in gin_flags:
    match = GIN_FLAG.fullmatch(flag)
    if not match:
      raise ValueError(f"unrecognized flag {flag!r}; gin bindings are --gin.NAME=VALUE.")
    name, value = match.groups()
    if "." not in name and "/" not in name:
      _check_macro(name)
    bindings.append(f"{name} = {value}")
  gin.parse_config(bindings)
  gin.finalize()


def _find_gin_file(name: str, roots) -> str:
  """The path of ``name`` as given or under the first root that has it (gin itself would log a
  "Path not found" error for each place it looks before the right one)."""
  for candidate in (name, *(os.path.join(root, name) for root in roots)):
    if os.path.isfile(candidate):
      return candidate
  raise ValueError(f"--gin_file={name}: no such file here or in {', '.join(roots)}"
                   " (--gin_search_paths adds folders).")


def _check_macro(name: str) -> None:
  try:
    gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    # gin's public config text lists every macro as a top-level `NAME = value` line.
    known = sorted(set(re.findall(r"^([A-Za-z_]\w*) = ", gin.config_str(), re.MULTILINE)))
    close = difflib.get_close_matches(name, known, n=3)
    raise ValueError(f"--gin.{name}: no gin file defines the macro {name}"
                     f"{'; did you mean ' + ', '.join(close) + '?' if close else ''}"
                     f" Known macros: {', '.join(known)}.") from None


def _install_templates(_args) -> int:
  """promptsource declares Python < 3.10 and pins an old streamlit app; its template code runs on
  3.11 with the dependencies tensorpoly-jax already installs, so it goes in without its own."""
  from tensorpoly_jax.data import prompts

  command = [sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-requires-python",
             f"promptsource=={prompts.PROMPTSOURCE_VERSION}"]
  print(" ".join(command))
  subprocess.run(command, check=True)
  print(f"promptsource ready: {len(prompts.template_names('super_glue', 'rte'))} RTE templates")
  return 0


def _convert(args) -> int:
  commands.convert(args.checkpoint_dir, args.output_dir, args.dtype, args.allow_pickle,
                   args.scan_layers)
  return 0


def _export(args) -> int:
  commands.export_peft(args.adapter_dir, args.output_dir, args.task_id, args.base_model)
  return 0


def _import(args) -> int:
  commands.import_peft(args.peft_dir, args.backbone_dir, args.output_dir)
  return 0


def _demo(args, gin_flags) -> int:
  parse_gin([DEMO_QUICK_GIN if args.quick else DEMO_GIN, *args.gin_file], gin_flags,
            args.model_dir, args.gin_search_paths)
  CONFIGURED["demo"]()
  return 0


def demo_config(gin_file: str = DEMO_GIN, gin_flags=()) -> demo.DemoConfig:
  """The demo's settings as its gin file (and ``--gin.NAME=value`` flags) give them, for scripts
  that run its stages."""
  parse_gin([gin_file], gin_flags)
  try:
    return gin.query_parameter("demo.config").scoped_configurable_fn()
  finally:
    gin.clear_config()  # parsing locked gin's registry; a script imports more after this


def _gin_command(function):
  def run(args, gin_flags):
    parse_gin(args.gin_file, gin_flags, args.model_dir, args.gin_search_paths)
    CONFIGURED["data_setup"]()
    CONFIGURED[function]()
    return 0

  return run


def _compile(args, gin_flags) -> int:
  """No data and no weights: shapes come from the gin files; exit 1 when the step does not fit."""
  parse_gin(["runs/compile.gin", *args.gin_file], gin_flags, None, args.gin_search_paths)
  try:
    CONFIGURED["compile_step"](args.stage, args.topology, json_path=args.json)
  except aot.DoesNotFit as err:
    print(f"tensorpoly compile: {err}", file=sys.stderr)
    return 1
  return 0


def _sweep(args, gin_flags) -> int:
  from tensorpoly_jax import sweep

  if not args.model_dir:
    raise ValueError("sweep needs --model_dir: each point runs in its own folder below it.")

  def run_point(point):
    parse_gin(args.gin_file, [*gin_flags, *sweep.point_flags(point)],
              os.path.join(args.model_dir, sweep.point_name(point)), args.gin_search_paths)
    CONFIGURED["data_setup"]()
    return CONFIGURED["pipeline_run"]()

  sweep.run(args.model_dir, sweep.parse_grid(args.sweep), run_point)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="tensorpoly", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, function, help_text in (
      ("train", "train", "multi-task training: adapters on a backbone, or the backbone"),
      ("adapt", "adapt", "few-shot adaptation of held-out tasks over seeds, then eval"),
      ("eval", "evaluate", "rank-classification evaluation of a backbone or adapter")):
    command = sub.add_parser(name, help=help_text)
    _gin_flags(command)
    command.set_defaults(run=_gin_command(function), takes_gin=True)
  sweep = sub.add_parser("sweep", help="a grid over gin macros, one run per point, then a table")
  _gin_flags(sweep)
  sweep.add_argument("--sweep", action="append", required=True, metavar="MACRO=v1,v2,...",
                     help="a macro and its values; repeat for a grid")
  sweep.set_defaults(run=_sweep, takes_gin=True)
  compile_ = sub.add_parser(
      "compile", help="ahead-of-time compile of a step for a TPU topology: memory, time, FLOPs")
  _gin_flags(compile_)
  compile_.add_argument("--stage", choices=aot.STAGES, default="pretrain")
  compile_.add_argument("--topology", default="local",
                        help="a TPU topology (v4:2x2x4, v5e:4x4; needs libtpu) or 'local'")
  compile_.add_argument("--json", default=None, help="also write the report here")
  compile_.set_defaults(run=_compile, takes_gin=True)
  demo_ = sub.add_parser("demo", help="the whole pipeline on the embedded mini-T0 suite"
                         f" ({DEMO_GIN}, then any --gin_file and --gin.NAME=value)")
  _gin_flags(demo_)
  demo_.add_argument("--quick", action="store_true",
                     help=f"the smoke-test size ({DEMO_QUICK_GIN}; minutes)")
  demo_.set_defaults(run=_demo, takes_gin=True)
  convert = sub.add_parser("convert", help="Hugging Face T5/T0 checkpoint -> Flax params")
  convert.add_argument("--checkpoint_dir", required=True,
                       help="folder with config.json and model.safetensors (or its shards), or a"
                       " Hugging Face hub id (bigscience/T0_3B) where the hub is reachable")
  convert.add_argument("--output_dir", required=True)
  convert.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  convert.add_argument("--allow_pickle", action="store_true",
                       help="read pytorch_model.bin pickles (with torch.load(weights_only=True))")
  convert.add_argument("--scan_layers", action="store_true",
                       help="store the layers stacked, as scanned presets (xl, xxl, T0) run them")
  convert.set_defaults(run=_convert)
  export = sub.add_parser("export", help="an adapter export -> PEFT (Hugging Face T5)")
  export.add_argument("--format", choices=("peft",), default="peft")
  export.add_argument("--adapter_dir", required=True, help="a tensorpoly adapter export folder")
  export.add_argument("--output_dir", required=True)
  export.add_argument("--task_id", type=int, default=None,
                      help="export this task's rank-r LoRA (default: an adapted export's task;"
                      " needed for multi-task TensorPoly adapters)")
  export.add_argument("--base_model", default=None,
                      help="PEFT's base_model_name_or_path, e.g. bigscience/T0_3B")
  export.set_defaults(run=_export)
  import_ = sub.add_parser("import", help="a PEFT LoRA / Poly adapter of T5 -> an adapter export")
  import_.add_argument("--format", choices=("peft",), default="peft")
  import_.add_argument("--peft_dir", required=True)
  import_.add_argument("--backbone_dir", required=True, help="the converted backbone it adapts")
  import_.add_argument("--output_dir", required=True)
  import_.set_defaults(run=_import)
  install = sub.add_parser("install-templates",
                           help="install the promptsource (P3) templates for the T0 tasks")
  install.set_defaults(run=_install_templates)
  return parser


def _gin_flags(command) -> None:
  command.add_argument("--gin_file", action="append", default=[], help="a gin file (repeatable)")
  command.add_argument("--gin_search_paths", action="append", default=[])
  command.add_argument("--model_dir", default=None, help="sets the MODEL_DIR macro")
  distributed.add_flags(command)


def main(argv=None) -> int:
  from tensorpoly_jax.trainer import Preempted

  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if rest and not getattr(args, "takes_gin", False):
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  if hasattr(args, "process_id"):  # commands that run JAX work join a multi-host run first
    distributed.initialize(distributed.group_from_args(args))
  try:
    if getattr(args, "takes_gin", False):
      return args.run(args, rest)
    return args.run(args)
  except Preempted as notice:  # a clean stop: the checkpoint is written
    print(f"tensorpoly: {notice}", file=sys.stderr)
    return 0


if __name__ == "__main__":
  sys.exit(main())
