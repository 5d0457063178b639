"""What the binaries share: one-line errors for bad flags and bad configs, quieter logging."""

import sys

from absl import flags, logging


def parse_flags_or_exit(argv):
  """absl's flag parsing (pass to `app.run(flags_parser=...)`), but a bad flag, an unreadable
  config file or a bad override is one line on stderr and exit status 2."""
  try:
    remaining = flags.FLAGS(argv)
    # Config files load lazily; read them now so that a missing or broken one fails here.
    for name in ("config",):
      value = flags.FLAGS[name].value if name in flags.FLAGS else None
      if value is not None:
        getattr(value, "keys", None)  # A config that failed to load raises OSError here.
    return remaining
  except (flags.Error, OSError, AttributeError, ValueError, TypeError, SyntaxError) as error:
    message = " ".join(str(error).split())
    print(f"error: bad flags: {message}", file=sys.stderr)
    sys.exit(2)


def quiet_logging() -> None:
  """absl logging at WARNING unless --verbosity was given (Orbax logs every save at INFO)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def run_or_exit(config, workdir):
  """`train.train_and_evaluate`, with a `ConfigError` as one line on stderr and exit status 2."""
  from experiments import train

  try:
    return train.train_and_evaluate(config, workdir)
  except train.ConfigError as error:
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)
