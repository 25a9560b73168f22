"""Write a checkpoint directory so that it appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(dst: Path, replace: bool = False):
    """Yield a temporary sibling of `dst` to fill; rename it to `dst` if the block succeeds.

    On any error the temporary directory is removed and `dst` is untouched. With
    `replace`, an existing `dst` is swapped out only after the new one is complete.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint should not be
        if replace and dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
