"""Fixtures shared by the client interceptor and lease channel suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from session_authority.clients._client import AuthorityClient
from session_authority.clients._keeper import LeaseKeeper


@pytest.fixture
def keeper() -> Iterator[LeaseKeeper]:
    """A lease keeper of the test's own, closed at the end."""
    running = LeaseKeeper()
    yield running
    running.close()


@pytest.fixture
def admin(authority) -> Iterator[AuthorityClient]:  # type: ignore[no-untyped-def]
    """A client of the test authority as the principal ``ops``, for admin calls (the test authority admits every caller as admin)."""
    with AuthorityClient(authority.target, principal="ops") as opened:
        yield opened
