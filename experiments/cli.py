"""Shared command-line behaviour of the experiment scripts.

* :class:`UsageError` (and its :class:`ConfigError` / :class:`ConfigTypeError`):
  a mistake of the person running the command (a bad config value, a workdir
  that holds another run). :func:`exit_on_usage_error` prints it as one line,
  ``train.py: error: <message>``, and exits with status 2, like argparse does;
  any other exception keeps its traceback.
* :func:`quiet_logging`: absl, orbax, TFDS and grain log at WARNING unless the
  command line sets absl's ``--verbosity`` (``-v``); ``--verbosity=0`` shows
  their INFO lines again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator


class UsageError(Exception):
  """The command cannot run as asked; the message is the whole explanation."""


class ConfigError(UsageError, ValueError):
  """A config field has a value the runner cannot use."""


class ConfigTypeError(ConfigError, TypeError):
  """A config field has the wrong type (a float batch size, a string epoch)."""


def quiet_logging(verbosity_set: bool = False) -> None:
  """Sets absl's and Python's logging to WARNING unless ``--verbosity`` was given.

  Args:
    verbosity_set: whether the command line set absl's ``--verbosity``; then
      its level stands.
  """
  if verbosity_set:
    return
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)


def verbosity_given() -> bool:
  """Whether absl's ``--verbosity``/``-v`` flag was on the command line."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  return "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present > 0


@contextlib.contextmanager
def exit_on_usage_error(program: str | None = None) -> Iterator[None]:
  """Turns a :class:`UsageError` into ``<program>: error: <message>`` and exit 2."""
  try:
    yield
  except UsageError as e:
    program = program or os.path.basename(sys.argv[0]) or "python"
    message = " ".join(str(e).split())  # one line, whatever the message holds
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None
