"""How the pipeline's files are written: whole or not at all, with the user's umask, and, for the
data steps, not at all when the bytes are what is already there.

- `unless_unchanged(path)`: the new version is written to a temporary file beside `path`, which
  replaces `path` only when its bytes differ, so an unchanged output is left as it was and a
  failed write leaves the old one. (Snakemake touches a job's outputs when it ends; what keeps
  the jobs after it from rerunning is the checksum Snakemake recorded for their inputs, see
  profiles/default/config.yaml, and the `tokenize` checkpoint.)
- `with_umask(path)`: safetensors writes its files mode 0600 whatever the umask (its writer
  opens them so); collaborators on a shared filesystem then cannot read adapters, checkpoints or
  built models. Everything under `path` gets the mode the user's umask gives (0644 and 0755
  under umask 022).
"""

import contextlib
import filecmp
import os
import shutil
import tempfile
from pathlib import Path


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def with_umask(path):
    """chmod `path` and, for a directory, everything under it to what the umask gives new
    files (0666 & ~umask) and directories (0777 & ~umask); returns `path`."""
    path = Path(path)
    mask = current_umask()
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for target in targets:
        if target.is_symlink():
            continue
        target.chmod((0o777 if target.is_dir() else 0o666) & ~mask)
    return path


@contextlib.contextmanager
def unless_unchanged(path):
    """A temporary path beside `path` to write the new version to; on leaving, it replaces
    `path` only when the bytes differ (else `path` keeps its file and time, and the temporary
    one goes). Whole or not at all: after an error `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        if path.is_file() and filecmp.cmp(temporary, path, shallow=False):
            temporary.unlink()
        else:
            with_umask(temporary)  # mkstemp makes it 0600
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def copy_unless_unchanged(source, path):
    """Copy file `source` to `path` unless `path` holds the same bytes; True when copied."""
    if Path(path).is_file() and filecmp.cmp(source, path, shallow=False):
        return False
    with unless_unchanged(path) as temporary:
        shutil.copyfile(source, temporary)
    return True
