"""Stopping training on request without losing it: SIGTERM (a SLURM time limit or preemption,
`kill`, `scancel`) or SIGINT (Ctrl-C) during the loop lets the current step finish, writes a
checkpoint of that step and ends the job with one line:

    loranotes: stopped at step 37 by SIGTERM; checkpoint saved; rerun to resume

A second signal before that abandons the step at once (nothing more is saved; the rerun resumes
from the last checkpoint). Outside the loop the signals keep their usual meaning.
"""

import logging
import signal
import threading

from errors import LoranotesError

log = logging.getLogger("loranotes.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(LoranotesError):
    """Training stopped on request; what was done is in the checkpoint."""


class StopRequest:
    """The first stop signal received while installed, by name (None: none yet)."""

    def __init__(self):
        self.signal = None

    def receive(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:  # asked twice: do not wait for the step
            raise Stopped(f"stopped by a second {name} during a step; the last checkpoint "
                          "stays; rerun to resume from it")
        self.signal = name
        log.info("%s received: stopping after this step", name)


class StopOnSignal:
    """While inside, the stop signals ask training to stop after the step under way; `check`
    after each step then saves a checkpoint of it and raises Stopped.

    `save_checkpoint(step)` writes the checkpoint, or returns False where none is kept.
    `agree(asked)` says whether any process of the run was asked to stop (distributed.Ranks.any:
    the ranks of a data-parallel run stop at the same step, or the others wait forever in the
    next all-reduce). The handlers are installed in the main thread only (Python allows no
    other) and restored on leaving."""

    def __init__(self, save_checkpoint, agree=bool):
        self.save_checkpoint = save_checkpoint
        self.agree = agree
        self.request = StopRequest()
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.request.receive) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def check(self, step):
        """After a step: nothing, or (a stop was asked) checkpoint it and raise Stopped."""
        if not self.agree(self.request.signal is not None):
            return
        self.request.signal = self.request.signal or "a signal to another rank"
        log.info("stopping at step %d (%s): saving its checkpoint", step, self.request.signal)
        if self.save_checkpoint(step) is False:
            outcome = "no checkpoint kept (no checkpoint directory); a rerun starts over"
        else:
            outcome = "checkpoint saved; rerun to resume"
        raise Stopped(f"stopped at step {step} by {self.request.signal}; {outcome}")
