"""Re-executes a recorded run in a fresh workdir and compares its metrics step by step.

  python launch/rerun.py runs/dora                      # every recorded step, in runs/dora/rerun-<n>
  python launch/rerun.py runs/dora --steps=3 --workdir=/tmp/dora_rerun

The last line is `rerun: identical (<n> steps)` or `rerun: differs at step <s>: <metric> <a> vs <b>`
(recorded value first); warnings before it name differences of code, packages or devices from run.json.
Exit status: 0 identical, 1 differs, 2 bad input.
"""

import sys

from absl import app, flags, logging

from jaxrl_peft.models.safetensors_io import CheckpointError
from jaxrl_peft.train import loop, rerun

_STEPS = flags.DEFINE_integer("steps", None, "compare the first N steps (default: every recorded step)")
_WORKDIR = flags.DEFINE_string("workdir", None, "fresh workdir for the rerun (default: RUN_DIR/rerun-<n>)")


def main(argv) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: launch/rerun.py RUN_DIR [--steps=N] [--workdir=NEW]")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        result = rerun.rerun(argv[1], _STEPS.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, loop.ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(result.line(), flush=True)
    sys.exit(0 if result.identical else 1)


if __name__ == "__main__":
    app.run(main)
