"""A private temporary directory per test (trial's mktemp() writes into the working tree)."""

from __future__ import annotations

import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase


def private_tmpdir(test: SynchronousTestCase, prefix: str = "securepub-test-") -> str:
    """A new directory, removed after ``test``; keys written there stay out of the tree."""
    path = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path
