"""Reading a JSON file from an untrusted folder in one line's worth of error, and writing a job's outputs: each file
under a temporary name, renamed into place when complete, and a write that the disk refuses reported against the
output, never against the input being copied (shutil's errors name the source)."""
import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import K2Error

def read_json(path: Path, label: str | None = None):
    """The JSON value in `path`, or one error naming the file (as `label`, default its path): missing, unreadable, not
    UTF-8, not JSON, or nested deeper than Python's parser goes."""
    label = label or str(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise K2Error(f"{label} not found") from None
    except OSError as e:
        raise K2Error(f"cannot read {label}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise K2Error(f"{label} is not valid JSON: {e}") from None
    except RecursionError:
        raise K2Error(f"{label} is nested too deeply to read") from None


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # full, over quota, file too large
DISK_REFUSED = (*NO_SPACE, errno.EROFS)  # or read-only


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
