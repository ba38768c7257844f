"""Method sweep (the study's Figure 1): trains every method x seed in its own workdir and process, then
writes sweep.json, sweep.md and the plots (accuracy_vs_share.png, reward_by_step.png) to --out.

  python launch/sweep.py --config=configs/grpo_dora.py:tiny --out=runs/sweep            # all 14 methods
  python launch/sweep.py --config=configs/grpo_dora.py:tiny --methods=lora,dora,pissa,vera \
      --config.steps=4 --out=runs/sweep4
  python launch/sweep.py --config=configs/grpo_dora.py --seeds=42,43 --out=runs/sweep_study   # the study's setting

--config names the directory of the configs/grpo_<method>.py files and their argument (':tiny' the
embedded default, none the study's setting); --config.<field>=<value> overrides apply to every run.
Runs are skipped when finished (resumable: run the same command again); a failed run does not stop
the others and is retried next time. --report_only rewrites the outputs from the workdirs.
"""

import sys
from pathlib import Path

from absl import app, flags

from jaxrl_peft.analysis import sweep

_CONFIG = flags.DEFINE_string("config", None, "configs/grpo_<method>.py[:tiny]: config directory and argument")
_METHODS = flags.DEFINE_list("methods", [], "methods to run (default: every configs/grpo_<method>.py)")
_SEEDS = flags.DEFINE_list("seeds", ["42"], "seeds; each method runs once per seed")
_OUT = flags.DEFINE_string("out", None, "sweep directory: OUT/<method>/seed<k>/ workdirs and the outputs")
_PLOTS = flags.DEFINE_bool("plots", True, "write the PNG plots (needs matplotlib)")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "train nothing; write the outputs from the workdirs")

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def main(argv, overrides: list[str]) -> None:
    del argv
    try:
        seeds = [int(s) for s in _SEEDS.value]
        runs = sweep.plan(_CONFIG.value, _METHODS.value, seeds, _OUT.value, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"sweep: {len(runs)} runs ({len({r.method for r in runs})} methods x {len(seeds)} seeds) in {_OUT.value}",
          flush=True)
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    if not _REPORT_ONLY.value:
        counts = sweep.sweep(runs, overrides, TRAIN_SCRIPT, log=lambda line: print(line, flush=True))
    meta = {"config": _CONFIG.value, "overrides": overrides, "seeds": seeds, "methods": [r.method for r in runs]}
    try:
        written = sweep.write_outputs(runs, _OUT.value, meta, plots=_PLOTS.value)
    except ImportError as e:
        print(f"error: {e} (or pass --noplots)", file=sys.stderr)
        sys.exit(2)
    print(Path(_OUT.value, "sweep.md").read_text())
    print(f"sweep: ran {counts['ran']}, skipped {counts['skipped']}, failed {counts['failed']}; "
          f"wrote {', '.join(p.name for p in written)}")
    sys.exit(1 if counts["failed"] else 0)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "out"])
    rest, config_overrides = sweep.split_overrides(sys.argv)
    app.run(lambda argv: main(argv, config_overrides), argv=rest)
