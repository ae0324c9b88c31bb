"""Writing a job's outputs: each file under a temporary name, renamed into place when complete, and a write that the
disk refuses reported against the output, never against the input being copied (shutil's errors name the source)."""
import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import K2Error

DISK_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # full, over quota, file too large, read-only


@contextmanager
def writing_to(out: Path, kept: str):
    """Around the writes of a job whose output is `out`: the disk refusing a write becomes one error naming `out`
    and saying what was `kept`."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_REFUSED:
            raise
        raise K2Error(f"cannot write {out}: {e.strerror}; {kept}") from None


def write_json_atomic(path: Path, data, **kwargs):
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, **kwargs))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_atomic(source: Path, path: Path):
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
