"""Readers of the audit records and ``session.end`` spans that the authority left after a demo run."""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Any

from session_authority.server._audit import VerifyResult, list_audit_files, verify

END_SPAN_NAME = "session.end"
FINGERPRINT_ATTRIBUTE = "session.lease.fingerprint"
END_REASON_ATTRIBUTE = "session.end_reason"


def verify_audit(audit_dir: pathlib.Path) -> VerifyResult:
    """Check the hash chain of the authority's audit directory."""
    return verify(audit_dir)


def audit_end_reasons(audit_dir: pathlib.Path) -> dict[str, list[str]]:
    """Return the reasons of the ``end`` records of each lease fingerprint, in log order."""
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for path in list_audit_files(audit_dir):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "end":
                reasons[record["fingerprint"]].append(record["reason"])
    return dict(reasons)


def read_console_spans(path: pathlib.Path) -> list[dict[str, Any]]:
    """Parse the output of OpenTelemetry's ``ConsoleSpanExporter``: JSON objects, one after another.

    The exporter writes each span as indented JSON followed by a line break,
    so the file is a sequence of objects rather than JSON Lines.
    """
    text = path.read_text() if path.exists() else ""
    decoder = json.JSONDecoder()
    spans: list[dict[str, Any]] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return spans
        span, index = decoder.raw_decode(text, index)
        spans.append(span)


def end_span_reasons(spans: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Return the ``session.end_reason`` of each ``session.end`` span, by lease fingerprint."""
    reasons: dict[str, list[str]] = collections.defaultdict(list)
    for span in spans:
        if span.get("name") != END_SPAN_NAME:
            continue
        attributes = span.get("attributes") or {}
        reasons[str(attributes.get(FINGERPRINT_ATTRIBUTE))].append(str(attributes.get(END_REASON_ATTRIBUTE)))
    return dict(reasons)
