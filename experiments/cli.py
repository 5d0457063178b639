"""What the binaries share: one-line errors for bad flags, bad configs and failed runs."""

import sys
import tempfile
import traceback

from absl import flags, logging

# Exit statuses: 2 a bad flag, config, data file or checkpoint (nothing was written); 3 the run
# diverged (NaN/Inf; no non-finite checkpoint was written); 1 an OS error while running, or a bug.
EXIT_CONFIG, EXIT_DIVERGED, EXIT_OS = 2, 3, 1


def _one_line(error) -> str:
  return " ".join(str(error).split())


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
    print(f"error: bad flags: {_one_line(error)}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def quiet_logging() -> None:
  """absl logging at WARNING unless --verbosity was given (Orbax logs every save at INFO)."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def run_or_exit(config, workdir):
  """`train.train_and_evaluate`, with every expected failure as one line on stderr and a non-zero
  exit: a `ConfigError` (flags, data files, checkpoints; status 2), a diverged run (3), an OS
  error such as a full disk while writing (1, naming the file). Anything else is a bug: one line
  naming the exception and a file holding its traceback (status 1)."""
  from experiments import train

  try:
    return train.train_and_evaluate(config, workdir)
  except train.ConfigError as error:
    print(f"error: {_one_line(error)}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)
  except train.TrainingDiverged as error:
    print(f"error: diverged: {_one_line(error)}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)
  except KeyboardInterrupt:
    print(
      f"interrupted: the checkpoints in {workdir!r} are kept; the same command resumes.",
      file=sys.stderr,
    )
    sys.exit(130)
  except OSError as error:
    where = f" {error.filename!r}:" if getattr(error, "filename", None) else ""
    print(
      f"error: while running in --workdir={workdir!r}:{where} {_one_line(error.strerror or error)}",
      file=sys.stderr,
    )
    sys.exit(EXIT_OS)
  except Exception as error:  # noqa: BLE001  (a bug: one line here, the traceback in a file)
    with tempfile.NamedTemporaryFile(
      "w", prefix="fgjax_traceback_", suffix=".txt", delete=False
    ) as file:
      traceback.print_exc(file=file)
    print(
      f"error: unexpected {type(error).__name__}: {_one_line(error)[:300]} "
      f"(traceback in {file.name})",
      file=sys.stderr,
    )
    sys.exit(EXIT_OS)
