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
import warnings

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


# The log file of the job under way: set by configure_logging, cleared when main ends.
_job_log = {"path": None}


def configure_logging(snakemake):
    """The job's messages go to its log file and, as progress, to the terminal, where lines of
    jobs running side by side are told apart by their prefix ("[train v1] step 10/100 ...")."""
    logging.basicConfig(filename=snakemake.log[0], level=logging.INFO, format="%(message)s")
    _job_log["path"] = str(snakemake.log[0])
    wildcards = getattr(snakemake, "wildcards", [])
    label = " ".join([getattr(snakemake, "rule", "loranotes"), *map(str, wildcards)])
    to_terminal = logging.StreamHandler()
    to_terminal.setFormatter(logging.Formatter(f"[{label}] %(message)s"))
    # entry_point's own error line reaches the terminal through sys.exit; print it only once.
    to_terminal.addFilter(lambda record: record.name != "loranotes")
    logger = logging.getLogger("loranotes")
    for handler in [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]:
        logger.removeHandler(handler)  # a process running several mains (tests) keeps one
    logger.addHandler(to_terminal)
    quiet_known_noise()


def quiet_known_noise():
    """Leave out third-party messages that come on every job and say nothing to the user."""
    # peft 0.21 reads transformers' is_gradient_checkpointing, deprecated in transformers 5.2x.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    # bitsandbytes 0.50, imported on a CPU with AVX512-BF16, tries to fetch a 4-bit CPU kernel
    # from the Hugging Face Hub (the `kernels` package) and warns when it cannot; its own CPU
    # kernel runs instead. On such a CPU the warning was in every job's log, and on every rank.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_hub_kernel_warning)


def _not_the_hub_kernel_warning(record):
    # one function, so that configuring logging again (tests run several mains) adds no filter
    return "kernels-community" not in record.getMessage()


def job_log_file():
    """The log file of the job under way (configure_logging's), or None outside a job."""
    return _job_log["path"]


def flush_logs():
    for handler in logging.getLogger().handlers:
        handler.flush()


def entry_point(main):
    """Decorate a script's main(snakemake): a LoranotesError becomes one line and exit code 1;
    Ctrl-C one line and exit code 130 (128 + SIGINT, as a shell reports it), not a traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except LoranotesError as error:
            exit_with(f"loranotes: {error}", 1)
        except KeyboardInterrupt:
            exit_with("loranotes: interrupted (Ctrl-C); rerun the same command to go on", 130)
        finally:
            _job_log["path"] = None  # the job is over (tests run several mains in one process)

    return run


def exit_with(message, exit_code):
    logging.getLogger("loranotes").error(message)  # into the job's log
    print(message, file=sys.stderr)  # onto the terminal, no traceback
    sys.exit(exit_code)
