"""Make the prepared split of the current dataset settings the data every later step reads
(results/data/{train,eval}.jsonl, stats.json): each file is replaced only where its bytes differ,
so data that came out as it was is left as it was (and its checksum, which Snakemake recorded,
reruns nothing after it). Then the
prepared folders of other settings go (this one stays: it is the data step's record)."""

import logging
import shutil
from pathlib import Path

from errors import configure_logging, entry_point
from outputs import copy_unless_unchanged

log = logging.getLogger("loranotes.use_prepared_data")


def use_prepared(prepared, targets):
    """Copy each prepared file to its target unless unchanged; {target: True if replaced}."""
    return {target: copy_unless_unchanged(source, target) for source, target in zip(prepared, targets)}


def remove_other_prepared(prepared_dir):
    """The prepared folders of other dataset settings, beside this one."""
    prepared_dir = Path(prepared_dir)
    for folder in prepared_dir.parent.iterdir():
        if folder.is_dir() and folder != prepared_dir:
            shutil.rmtree(folder)


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    replaced = use_prepared(list(snakemake.input), list(snakemake.output))
    for target, was_replaced in replaced.items():
        log.info("%s: %s", target, "updated" if was_replaced else
                 "unchanged (same bytes; left as it was)")
    remove_other_prepared(Path(snakemake.input.train).parent)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
