"""``tensorpoly`` command line: T5X-style ``--gin_file`` / ``--gin.NAME=value`` / ``--model_dir``.

The only module that parses gin and flags; every library object it binds is a plain dataclass
or function, registered here as a gin configurable.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import subprocess
import sys
import tokenize
import traceback
from typing import Callable

import gin

from tensorpoly_jax import aot, checkpoints, commands, decoding, demo, distributed, paths, run_lock
from tensorpoly_jax import cli_reference as reference
from tensorpoly_jax import configurables  # noqa: F401 (registers the configs' gin names)
from tensorpoly_jax import merge as merging
from tensorpoly_jax.cli_reference import CONFIGS
from tensorpoly_jax.data import embedded, sources, t0

# gin wraps the functions: the CLI calls these wrapped versions, which read the bindings.
CONFIGURED = {fn.__name__: gin.external_configurable(fn, module="tensorpoly_jax")
              for fn in (commands.data_setup, commands.train, commands.adapt, commands.evaluate,
                         commands.model_config, commands.pipeline_run, commands.compile_step,
                         commands.infer)}
gin.external_configurable(decoding.DecodeConfig, module="tensorpoly_jax")  # runs/infer.gin
CONFIGURED["demo"] = gin.external_configurable(demo.run, "demo", module="tensorpoly_jax")
for _cls in (demo.DemoConfig, demo.Method, embedded.Sizes):  # runs/demo.gin's settings
  gin.external_configurable(_cls, module="tensorpoly_jax")
gin.external_configurable(t0.Protocol, "T0Protocol", module="tensorpoly_jax")  # runs/data_t0.gin
DEMO_GIN, DEMO_QUICK_GIN = "runs/demo.gin", "runs/demo_quick.gin"
INFER_GIN = "runs/infer.gin"

GIN_FLAG = re.compile(r"--gin\.([A-Za-z_][\w./]*)=(.*)", re.S)
# Refusals a user fixes by changing the command line, the gin files or the data: one line on
# stderr and exit 2 (gin's parse errors are SyntaxError and tokenize.TokenError). gin's lookups
# raise ValueError, so a KeyError stays a bug, with its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, SyntaxError, tokenize.TokenError,
               sources.DataSourceError, run_lock.ModelDirLocked,
               checkpoints.CheckpointsDamagedError)


def parse_gin(gin_files, gin_flags, model_dir=None, search_paths=()) -> None:
  """Parses the files, then the flag bindings; a flag that names no macro the files define, a
  parameter gin does not know, or a required macro left unset fails here, before any work."""
  _read_gin(gin_files, gin_flags, model_dir, search_paths)
  unset = reference.unset_macros()
  if unset:
    flags = ["--model_dir=DIR" if name == "MODEL_DIR" else f"--gin.{name}=\"'...'\""
             for name in unset]
    them = "it" if len(unset) == 1 else "them"
    raise ValueError(f"{', '.join(unset)} must be set (the gin files leave {them}"
                     f" %gin.REQUIRED): add {' '.join(flags)}.")
  gin.finalize()


def _read_gin(gin_files, gin_flags, model_dir=None, search_paths=()) -> None:
  """The files, then ``MODEL_DIR`` and the flag bindings, unchecked for required macros."""
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
    known = reference.defined_macros()
    close = difflib.get_close_matches(name, known, n=3)
    raise ValueError(f"--gin.{name}: no gin file defines the macro {name}"
                     f"{'; did you mean ' + ', '.join(close) + '?' if close else '.'}"
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
  commands.import_peft(args.peft_dir, args.backbone_dir, args.output_dir,
                       not args.skip_base_model_check)
  return 0


def _infer(args) -> int:
  parse_command_gin(args)
  CONFIGURED["infer"](backbone_dir=args.backbone_dir, input_file=args.input_file,
                      output_file=args.output_file, adapter_dir=args.adapter_dir,
                      vocabulary_dir=args.vocabulary_dir)
  return 0


def _merge(args) -> int:
  commands.merge(args.backbone_dir, args.adapter_dir, args.output_dir, args.task_id, args.format)
  return 0


def parse_command_gin(args) -> None:
  """Parses what a gin command reads: its own run file (compile, demo), its --gin_files, then
  ``--model_dir`` and its --gin.NAME=VALUE bindings."""
  parse_gin([*args.first_gin_files, *args.gin_file], args.gin_flags,
            getattr(args, "model_dir", None), args.gin_search_paths)


CONFIG_FILE = "config.gin"


def recording_config(run: Callable[[], object]):
  """``run()`` with the resolved gin config in ``MODEL_DIR/config.gin``, as T5X writes it: at the
  start in a new model dir, and once the run succeeds, so that a rerun refused for other settings
  (or failing) leaves the config of the run that wrote the folder."""
  model_dir = reference.macro_value("MODEL_DIR")
  config, target = gin.config_str(), paths.resolve(os.path.join(model_dir, CONFIG_FILE))
  if not target.exists():
    paths.atomic_write(target, config)
  result = run()
  paths.atomic_write(target, config)
  return result


def _demo(args) -> int:
  parse_command_gin(args)
  recording_config(CONFIGURED["demo"])
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
  def run(args):
    parse_command_gin(args)
    CONFIGURED["data_setup"]()
    recording_config(CONFIGURED[function])
    return 0

  return run


def _registered_data(args):
  """Registers the data file's suite: its routing id map, MIXTURE and HELDOUT."""
  parse_command_gin(args)
  routing_ids = CONFIGURED["data_setup"]()
  return routing_ids, reference.macro_value("MIXTURE"), reference.macro_value("HELDOUT")


def _data(args) -> int:
  """Registers a data setup and reads every task of its mixture and held-out tasks; exit 1 when
  one cannot be used."""
  registered = _registered_data(args)
  # A user's own data file may leave the length to the run files.
  length = (reference.macro_value("TARGETS_LENGTH")
            if "TARGETS_LENGTH" in reference.defined_macros() else None)
  return commands.check_data(*registered, targets_length=length)


def _compile(args) -> int:
  """No data and no weights: shapes come from the gin files; exit 1 when the step does not fit."""
  parse_command_gin(args)
  try:
    CONFIGURED["compile_step"](args.stage, args.topology, json_path=args.json)
  except aot.DoesNotFit as err:
    print(f"tensorpoly compile: {err}", file=sys.stderr)
    return 1
  return 0


def _sweep(args) -> int:
  from tensorpoly_jax import sweep

  def describe(point):  # a point's record keeps its whole resolved config
    parse_gin(args.gin_file, [*args.gin_flags, *sweep.point_flags(point)],
              os.path.join(args.model_dir, sweep.point_name(point)), args.gin_search_paths)
    return {"gin": gin.config_str()}

  def run_point(point):  # runs the config ``describe`` parsed
    CONFIGURED["data_setup"]()
    return recording_config(CONFIGURED["pipeline_run"])

  sweep.run(args.model_dir, sweep.parse_grid(args.sweep), run_point, describe)
  return 0


def _list(args) -> int:
  """Methods and presets are the code's registries; tasks and macros are what gin files give."""
  reads_gin = args.what in ("tasks", "macros")
  if reads_gin and not args.gin_file:
    raise ValueError(f"list {args.what} reads gin files: give a data file (--gin_file="
                     f"{' or --gin_file='.join(reference.DATA_FILES)}) and any run files.")
  if not reads_gin and (args.gin_file or args.gin_flags):
    raise ValueError(f"list {args.what} reads no gin file; drop --gin_file and --gin.NAME=VALUE.")
  if args.what == "tasks":
    routing_ids, mixture, heldout = _registered_data(args)
    print(reference.task_table(routing_ids, mixture, commands.task_list(mixture),
                               commands.task_list(heldout)))
  elif args.what == "macros":  # unfinalized: a required macro left unset is listed, not refused
    _read_gin(args.gin_file, args.gin_flags, None, args.gin_search_paths)
    print(reference.macro_table())
  else:
    print(reference.method_table() if args.what == "methods" else reference.preset_table())
  return 0


DESCRIPTION = """\
Multi-task adapters (LoRA, TLoRA, Poly, MHR, TensorPoly-I/II) for T5 and T0 in JAX, run the
T5X way: gin files (--gin_file), gin bindings (--gin.NAME=VALUE) and a run directory
(--model_dir)."""
EPILOG = f"""\
`tensorpoly COMMAND --help` lists a command's flags, the macros its gin files MUST set and an
example. A --gin_file is a path, or a name under --gin_search_paths or {CONFIGS}.
`tensorpoly list methods|presets|tasks|macros` shows what there is to choose from.
A user error prints one line and exits 2 (--debug adds the traceback)."""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="tensorpoly", description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--version", action="version", version=f"%(prog)s {reference.version()}",
                      help="print the tensorpoly-jax version and exit")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                              help="one of these; `tensorpoly COMMAND --help` for its flags")
  add = functools.partial(_add_command, sub)
  for name, function, help_text in (
      ("train", "train", "multi-task training: adapters on a backbone, or the backbone"),
      ("adapt", "adapt", "few-shot adaptation of held-out tasks over seeds, then eval"),
      ("eval", "evaluate", "rank-classification evaluation of a backbone or adapter")):
    _add_multihost(add(name, help_text, _gin_command(function), gin=True,
                       model_dir_help="the run directory: sets the MODEL_DIR macro"))
  _add_multihost(add(
      "data", "check a data setup (runs/data_*.gin): rows, templates, dropped rows, one rendered"
      " example per held-out task; exit 1 if a task cannot be used", _data, gin=True))
  sweep = add("sweep", "a grid over gin macros, one run per point, then a table", _sweep,
              gin=True, model_dir_help="the sweep's directory: each point runs in its own folder"
              " below it (its MODEL_DIR)")
  sweep.add_argument("--sweep", action="append", required=True, metavar="MACRO=v1,v2,...",
                     help="a macro and its values; repeat for a grid")
  _add_multihost(sweep)
  compile_ = add("compile", "ahead-of-time compile of a step for a TPU topology: memory, time,"
                 " FLOPs, kernels", _compile, gin=True)
  compile_.set_defaults(first_gin_files=("runs/compile.gin",))
  compile_.add_argument("--stage", choices=aot.STAGES, default="pretrain",
                        help="the step to compile (default: %(default)s; frozen: the"
                        " pretraining step's floor, no adapter, for comparing kernel counts)")
  compile_.add_argument("--topology", default="local", metavar="NAME",
                        help="a TPU topology (v4:2x2x4, v5e:4x4; needs libtpu) or 'local'")
  compile_.add_argument("--json", default=None, metavar="PATH",
                        help="also write the report here")
  _add_multihost(compile_)
  demo_ = add("demo", "the whole pipeline on the embedded mini-T0 suite", _demo, gin=True,
              model_dir_help=f"the demo's directory (default: MODEL_DIR of {DEMO_GIN}, or of"
              f" {DEMO_QUICK_GIN} with --quick)")
  demo_.add_argument("--quick", action="store_const", dest="first_gin_files",
                     const=(DEMO_QUICK_GIN,), default=(DEMO_GIN,),
                     help=f"the smoke-test size ({DEMO_QUICK_GIN}; minutes)")
  _add_multihost(demo_)
  infer = add("infer", "generate text (or rank given choices) for a JSONL file of requests, each"
              " routed by its task", _infer, gin=True)
  infer.set_defaults(first_gin_files=(INFER_GIN,))
  infer.add_argument("--backbone_dir", required=True, help="a converted backbone (`tensorpoly"
                     " convert`, or `tensorpoly merge`)")
  infer.add_argument("--adapter_dir", default=None,
                     help="an adapter export, pretrained or adapted (default: the backbone alone)")
  infer.add_argument("--input_file", required=True, metavar="IN.jsonl",
                     help="one request per line: \"inputs\" (text) or \"input_ids\", optional"
                     " \"task\" or \"task_id\", optional \"choices\"")
  infer.add_argument("--output_file", required=True, metavar="OUT.jsonl",
                     help="each request plus \"prediction_ids\", \"prediction\" (and"
                     " \"scores\", \"choice\" for choices), in input order; a rerun resumes it")
  infer.add_argument("--vocabulary_dir", default=None,
                     help="a folder with spiece.model for text requests (default: the backbone"
                     " folder, then the checkpoint it was converted from)")
  _add_multihost(infer)
  listing = add("list", "what there is to choose from: adapter methods, model presets, a data"
                " file's tasks, gin files' macros", _list, gin=True)
  listing.add_argument("what", choices=("methods", "presets", "tasks", "macros"),
                       help="methods: adapters/*.gin; presets: models/*.gin; tasks: the mixture"
                       " and held-out tasks of a runs/data_*.gin; macros: every macro of the"
                       " --gin_files and its value")
  _add_file_commands(add)
  return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
  """Each command's parser (argparse exposes them only through its subparsers action)."""
  return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _add_file_commands(add) -> None:
  """The commands that read and write files, with no gin."""
  convert = add("convert", "Hugging Face T5/T0 checkpoint -> Flax params", _convert)
  convert.add_argument("--checkpoint_dir", required=True,
                       help="folder with config.json and model.safetensors (or its shards), or a"
                       " Hugging Face hub id (bigscience/T0_3B) where the hub is reachable")
  convert.add_argument("--output_dir", required=True,
                       help="where the converted backbone goes (the BACKBONE_DIR of runs)")
  convert.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="the stored params' dtype (default: %(default)s; bfloat16 for T0 on"
                       " TPU: `tensorpoly compile` shows why)")
  convert.add_argument("--allow_pickle", action="store_true",
                       help="read pytorch_model.bin pickles (with torch.load(weights_only=True))")
  convert.add_argument("--scan_layers", action="store_true",
                       help="store the layers stacked, as scanned presets (xl, xxl, T0) run them")
  peft_format = dict(choices=("peft",), default="peft",
                     help="the other side's format (only PEFT: Hugging Face's peft library)")
  export = add("export", "an adapter export -> PEFT (Hugging Face T5)", _export)
  export.add_argument("--format", **peft_format)
  export.add_argument("--adapter_dir", required=True, help="a tensorpoly adapter export folder")
  export.add_argument("--output_dir", required=True,
                      help="where the PEFT adapter folder goes (PeftModel.from_pretrained)")
  export.add_argument("--task_id", type=int, default=None,
                      help="export this task's rank-r LoRA (default: an adapted export's task;"
                      " needed for multi-task TensorPoly adapters)")
  export.add_argument("--base_model", default=None,
                      help="PEFT's base_model_name_or_path, e.g. bigscience/T0_3B")
  import_ = add("import", "a PEFT LoRA / Poly adapter of T5 -> an adapter export", _import)
  import_.add_argument("--format", **peft_format)
  import_.add_argument("--peft_dir", required=True,
                       help="a PEFT adapter folder (adapter_config.json and its weights)")
  import_.add_argument("--backbone_dir", required=True, help="the converted backbone it adapts")
  import_.add_argument("--output_dir", required=True,
                       help="where the adapter export goes (the ADAPTER_DIR of runs)")
  import_.add_argument("--skip_base_model_check", action="store_true",
                       help="import although the adapter's base_model_name_or_path names another"
                       " model than the backbone was converted from (the same model renamed)")
  merge = add("merge", "fold one task's adapter into the backbone -> a converted backbone or a"
              " Hugging Face T5 checkpoint", _merge)
  merge.add_argument("--backbone_dir", required=True,
                     help="the converted backbone the adapter was trained on")
  merge.add_argument("--adapter_dir", required=True, help="a tensorpoly adapter export folder")
  merge.add_argument("--output_dir", required=True, help="where the merged model goes")
  merge.add_argument("--task_id", type=int, default=None,
                     help="the task whose adapter is folded in (default: an adapted export's task;"
                     " needed for multi-task routed adapters)")
  merge.add_argument("--format", choices=merging.FORMATS, default="converted",
                     help="converted: a backbone folder that --backbone_dir and BACKBONE_DIR read;"
                     " hf: config.json and model.safetensors for T5ForConditionalGeneration"
                     " (default: %(default)s)")
  add("install-templates", "install the promptsource (P3) templates for the T0 tasks",
      _install_templates)


def _add_command(sub, name: str, help_text: str, run, gin: bool = False,
                 model_dir_help: str | None = None):
  """A subcommand with its epilog and --debug; a ``gin`` one takes --gin_file and gin bindings,
  and --model_dir where ``model_dir_help`` says what it is."""
  command = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=reference.epilog(name, model_dir_help is not None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
  command.set_defaults(run=run)
  command.add_argument("--debug", action="store_true",
                       help="on a user error, print the traceback too")
  if gin:
    command.set_defaults(first_gin_files=())
    command.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                         help="a gin file: a path, or a name under --gin_search_paths or the"
                         " configs folder (repeatable; later files override earlier ones)")
    command.add_argument("--gin_search_paths", action="append", default=[], metavar="DIR",
                         help="a folder to look for --gin_file names and their includes in,"
                         " before the configs folder (repeatable)")
    command.add_argument_group("gin bindings", reference.GIN_BINDINGS)
  if model_dir_help:
    command.add_argument("--model_dir", default=None, required=name == "sweep", metavar="DIR",
                         help=model_dir_help)
  return command


def _add_multihost(command) -> None:
  """The flags of a command that runs JAX work: it joins a multi-host run first (main)."""
  distributed.add_flags(command.add_argument_group(
      "multi-host run", "all three, or none to let JAX detect the cluster (SLURM, Open MPI, TPU"
      " VM);\nthe TENSORPOLY_* environment variables stand in for them"))


def parse_args(argv) -> argparse.Namespace:
  """Argparse for the flags, and --gin.NAME=VALUE bindings (``args.gin_flags``), which argparse
  cannot declare (their names are the gin files'); anything else argparse does not know is
  refused, not passed on."""
  parser = build_parser()
  is_gin = lambda arg: arg.startswith("--gin.")
  args, unknown = parser.parse_known_args([arg for arg in argv if not is_gin(arg)])
  args.gin_flags = [arg for arg in argv if is_gin(arg)]
  if args.gin_flags and not hasattr(args, "gin_file"):
    unknown = [*args.gin_flags, *unknown]
  if unknown:
    parser.error(f"{args.command}: unrecognized arguments: {' '.join(unknown)}"
                 f" (`tensorpoly {args.command} --help` lists its flags)")
  return args


def main(argv=None) -> int:
  """Runs one command; returns its exit status.

  As the ``tensorpoly`` program (``argv`` None: the console script, ``python -m tensorpoly_jax``),
  a user error (USER_ERRORS) prints one line, ``tensorpoly: error: ...``, and returns 2, with its
  traceback only under --debug; any other exception is a bug and keeps its traceback (exit 1).
  Called with an ``argv`` list (tests, scripts), every exception reaches the caller."""
  from tensorpoly_jax.trainer import Preempted

  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if hasattr(args, "process_id"):  # commands that run JAX work join a multi-host run first
      distributed.initialize(distributed.group_from_args(args))
    return args.run(args)
  except Preempted as notice:  # a clean stop: the checkpoint is written
    print(f"tensorpoly: {notice}", file=sys.stderr)
    return 0
  except USER_ERRORS as err:
    if argv is not None:
      raise
    if args.debug:
      traceback.print_exc()
    # gin appends "In call to configurable ..." lines to errors raised inside configurables.
    message = re.sub(r"\n  In call to configurable [^\n]*", "", str(err))
    print(f"tensorpoly: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
