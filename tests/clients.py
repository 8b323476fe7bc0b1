"""The real client programs tests run, found once, with their skip markers, and file digests.

`KUBECTL` and `CURL` are the paths `shutil.which` finds (the bare name when the program is not
installed: a test that runs it carries `needs_kubectl` / `needs_curl` and is then skipped).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

KUBECTL = shutil.which("kubectl") or "kubectl"
CURL = shutil.which("curl") or "curl"
HAVE_KUBECTL = shutil.which("kubectl") is not None
HAVE_CURL = shutil.which("curl") is not None

needs_kubectl = pytest.mark.skipif(not HAVE_KUBECTL, reason="kubectl not installed")
needs_curl = pytest.mark.skipif(not HAVE_CURL, reason="curl not installed")


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's contents (hex), read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()
