"""Pretraining or last-mile adaptation: `python -m experiments.main --config=... --workdir=...`.

Only parses flags and calls `experiments.train.train_and_evaluate(config, workdir)` (flax examples'
layout). A bad flag, an unknown name, a missing data folder or a checkpoint of another model prints
one line on stderr and exits with status 2, before anything is written into the workdir.
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
