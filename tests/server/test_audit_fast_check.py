"""Event validation: values that look plain but that the canonical JSON encoding rejects."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from session_authority.server import AuditLog, AuditSink


@pytest.mark.skipif(not hasattr(sys, "get_int_max_str_digits"), reason="no integer string conversion limit before 3.11")
def test_sink_rejects_int_too_long_to_encode(tmp_path: Path) -> None:
    oversized_int = 10 ** (sys.get_int_max_str_digits() + 1)
    with AuditLog(tmp_path) as log:
        sink = AuditSink(log)
        try:
            with pytest.raises(ValueError, match=r"^audit fields must be finite numbers and valid text"):
                sink.submit("end:oversized", "end", {"count": oversized_int})
        finally:
            sink.close()


@pytest.mark.skipif(not hasattr(sys, "get_int_max_str_digits"), reason="no integer string conversion limit before 3.11")
def test_log_append_rejects_int_too_long_to_encode(tmp_path: Path) -> None:
    oversized_int = 10 ** (sys.get_int_max_str_digits() + 1)
    with AuditLog(tmp_path) as log:
        with pytest.raises(ValueError, match=r"^audit fields must be finite numbers and valid text"):
            log.append("end:oversized", "end", {"count": oversized_int})
