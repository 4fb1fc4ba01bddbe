"""Make the interceptor test harness importable as ``lease_harness``."""

from __future__ import annotations

import pathlib
import sys

_HERE = str(pathlib.Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
