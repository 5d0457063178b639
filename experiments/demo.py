"""The last mile end to end on scikit-learn's digits (no network, no data folder).

1. Pretrain a SmallCNN by backprop in float on upright digits.
2. Adapt it to rotated digits from 100 examples with fixed-point sign-m-SPSA at w16a8: 16-bit
   integer weights (perturbed and updated on their grid, stochastic rounding, saturating adds),
   8-bit activations, forward passes only.
3. Adapt it the same way by backprop in float32, for reference.
4. Print (and save in the workdir) one table: zero-shot and adapted accuracy, steps, passes and the
   estimated peak memory of each training step beside backprop's.

Command: `python -m experiments.demo [--workdir=/tmp/fgjax_demo] [--config.adapt.steps=...]`
(the config is experiments/configs/digits_demo.py; `--config.reference.*` sets the backprop run).
Runtime and result: see experiments/configs/digits_demo.py.
"""

import json
import pathlib
import sys
import tempfile

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where the three runs go (default: a new temp dir)."
)
config_flags.DEFINE_config_file(
  "config", str(pathlib.Path(__file__).parent / "configs" / "digits_demo.py"), "Demo config."
)


def reference_config(config):
  """The config of the backprop reference run: `config.reference` applied over `config.adapt`."""
  reference = config.copy_and_resolve_references()
  for key, value in config.reference.items():
    if key == "learning_rate":
      reference.adapt.optimizer_kwargs.learning_rate = value
    else:
      setattr(reference.adapt, key, value)
  return reference


def run_demo(config, workdir) -> list[dict]:
  """Pretrain, adapt with the config's method and with backprop; returns the three summaries."""
  workdir = pathlib.Path(workdir)
  pretrain = config.copy_and_resolve_references()
  pretrain.mode = "pretrain"
  summaries = [cli.run_or_exit(pretrain, workdir / "pretrain")]
  adapt = config.copy_and_resolve_references()
  adapt.mode = "adapt"
  adapt.adapt.pretrained = str(workdir / "pretrain")
  reference = reference_config(adapt)
  for name, run_config in ((config.adapt.method, adapt), ("backprop reference", reference)):
    summary = cli.run_or_exit(run_config, workdir / name.replace(" ", "_"))
    summary["name"] = name
    summaries.append(summary)
  return summaries


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  cli.quiet_logging()
  from experiments import train

  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="fgjax_demo_")
  summaries = run_demo(FLAGS.config, workdir)
  table = train.summary_table(summaries)
  (pathlib.Path(workdir) / "summary.md").write_text(table + "\n")
  (pathlib.Path(workdir) / "summary.json").write_text(
    json.dumps(summaries, indent=2, default=str) + "\n"
  )
  print(table)
  print(f"\nWorkdir: {workdir}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_or_exit)
