"""``tensorpoly`` command line (T5X-style flags)."""
from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np


def _convert(args) -> int:
  from tqdm import tqdm

  from tensorpoly_jax.t5 import convert

  dtype = {"float32": np.float32, "bfloat16": "bfloat16"}[args.dtype]
  if dtype == "bfloat16":
    import ml_dtypes

    dtype = ml_dtypes.bfloat16
  with tqdm(desc="converting tensors", unit=" tensors") as bar:
    config, params = convert.load_hf_checkpoint(args.checkpoint_dir, args.allow_pickle, dtype,
                                                progress=lambda name: bar.update(1))
  convert.save_converted(args.output_dir, config, params)
  print(f"wrote {args.output_dir} ({convert.CONVERTED_CONFIG}, {convert.CONVERTED_PARAMS}/)")
  return 0


def _install_templates(args) -> int:
  """promptsource declares Python < 3.10 and pins an old streamlit app; its template code runs on
  3.11 with the dependencies tensorpoly-jax already installs, so it goes in without its own."""
  from tensorpoly_jax.data import prompts

  command = [sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-requires-python",
             f"promptsource=={prompts.PROMPTSOURCE_VERSION}"]
  print(" ".join(command))
  subprocess.run(command, check=True)
  from tensorpoly_jax.data import prompts as fresh

  print(f"promptsource ready: {len(fresh.template_names('super_glue', 'rte'))} RTE templates")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="tensorpoly", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser("convert", help="Hugging Face T5/T0 checkpoint -> Flax params")
  convert.add_argument("--checkpoint_dir", required=True,
                       help="folder with config.json and model.safetensors (or its shards)")
  convert.add_argument("--output_dir", required=True)
  convert.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  convert.add_argument("--allow_pickle", action="store_true",
                       help="read pytorch_model.bin pickles (with torch.load(weights_only=True))")
  convert.set_defaults(run=_convert)
  install = commands.add_parser("install-templates",
                                help="install the promptsource (P3) templates for the T0 tasks")
  install.set_defaults(run=_install_templates)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
