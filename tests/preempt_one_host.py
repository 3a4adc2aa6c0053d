"""``tensorpoly`` as one process of a multi-host run that sends itself SIGTERM right after it
saves checkpoint step ``$PREEMPT_AFTER_STEP``: a preemption notice that reaches one host only."""
import os
import signal
import sys

from tensorpoly_jax import checkpoints, cli

AFTER_STEP = int(os.environ["PREEMPT_AFTER_STEP"])
_save = checkpoints.save


def _save_then_notice(mngr, step, state, meta):
  _save(mngr, step, state, meta)
  if step == AFTER_STEP:
    os.kill(os.getpid(), signal.SIGTERM)


checkpoints.save = _save_then_notice
sys.exit(cli.main(sys.argv[1:]))
