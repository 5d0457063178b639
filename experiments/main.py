"""Pretraining or last-mile adaptation: `python -m experiments.main --config=... --workdir=...`.

Only parses flags and calls `experiments.train.train_and_evaluate(config, workdir)` (flax examples'
layout). Every config value, the workdir, the data files and the checkpoints are checked before
anything is written into the workdir: a bad one prints one line on stderr (`error: ...`, naming the
flag or the file) and exits with status 2. A run whose loss or weights become NaN/Inf exits with
status 3 and leaves no non-finite checkpoint; an OS error while running (a full disk) exits with
status 1. See docs/binaries.md.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for checkpoints, metrics and the summary."
)
config_flags.DEFINE_config_file("config", None, "Path to a config file (experiments/configs/*.py).")


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.config is None or not _WORKDIR.value:
    print("error: both --config=<file> and --workdir=<dir> are required.", file=sys.stderr)
    sys.exit(2)
  cli.quiet_logging()
  from experiments import train

  summary = cli.run_or_exit(FLAGS.config, _WORKDIR.value)
  print(train.summary_table([summary]))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_or_exit)
