import sys

from tensorpoly_jax.cli import main

sys.exit(main())
