"""One rank of a data-parallel training run: what torchrun starts `training.devices` times.
train.py's main launches it (distributed.launch) with the run's arguments as a JSON file."""

import json
import os
import sys
from pathlib import Path

import torch

from distributed import configure_rank_logging
from errors import entry_point
from trackers import Trackers, open_trackers
from train import train


@entry_point
def main(arguments_file):
    arguments = json.loads(Path(arguments_file).read_text())
    rank = int(os.environ["RANK"])
    configure_rank_logging(arguments["log"], rank)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tracking = arguments.get("tracking")  # none: the run is not logged to a tracker
    with (open_trackers(**tracking, rank=rank) if tracking else Trackers()) as trackers:
        train(**arguments["train"], trackers=trackers)


if __name__ == "__main__":
    main(sys.argv[1])
