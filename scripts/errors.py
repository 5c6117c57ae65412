"""Mistakes the user can fix, reported as one line that says what is wrong and what to do.

Scripts raise a LoranotesError (or a subclass: ConfigError, DataError, ModelError,
TrainingError) for those; `entry_point` turns it into that one line in the job's log and on
stderr, and exit code 1, instead of a long traceback. Anything else is a bug and keeps its
traceback.
"""

import functools
import logging
import os
import re
import sys

# Hugging Face access tokens start with "hf_"; they must never reach a log or the report.
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{6,}")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class LoranotesError(Exception):
    """A problem with the config, data, model or environment; the message says how to fix it."""

    def __str__(self):
        # Messages quote config values and library errors; neither may carry a token onward.
        return redact(super().__str__())


def redact(text):
    """text with any Hugging Face token (from the environment or token-shaped) replaced."""
    for variable in TOKEN_VARIABLES:
        token = os.environ.get(variable)
        if token:
            text = text.replace(token, "<redacted>")
    return TOKEN_PATTERN.sub("<redacted>", text)


def first_line(error):
    """The first line of an exception's message, for wrapping it in a LoranotesError."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def entry_point(main):
    """Decorate a script's main(snakemake): a LoranotesError becomes one line and exit code 1."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except LoranotesError as error:
            message = f"loranotes: {error}"
            logging.getLogger("loranotes").error(message)  # into the job's log, once configured
            sys.exit(message)

    return run
