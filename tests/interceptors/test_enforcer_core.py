"""Unit tests of the enforcement core's pure parts: metadata parsing, caches, rule lookup."""

from __future__ import annotations

import pytest

from session_authority.clients._types import MethodRuleInfo, PolicyInfo
from session_authority.interceptors._cache import ExpiringLru
from session_authority.interceptors._enforcer import _RuleBook, read_lease_id
from session_authority.interceptors._errors import LeaseMalformed, LeaseMissing

KEY = "session-lease"


@pytest.mark.parametrize(
    ("metadata", "error", "message"),
    [
        ((), LeaseMissing, "carries no session lease"),
        (((KEY, ""),), LeaseMalformed, "is empty"),
        (((KEY, "a" * 257),), LeaseMalformed, "over the maximum 256"),
        (((KEY, "l\u00e9ase"),), LeaseMalformed, "not printable ASCII"),
        (((KEY, "lease\tid"),), LeaseMalformed, "not printable ASCII"),
        (((KEY + "-bin", b"x"),), LeaseMalformed, "binary metadata"),
        (((KEY, "a"), (KEY, "a")), LeaseMalformed, "repeated 2 times"),
        (((KEY, b"raw"),), LeaseMalformed, "is binary"),
    ],
)
def test_read_lease_id_rejects(metadata: tuple, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        read_lease_id(metadata, KEY)

    assert caught.value.code.name == "UNAUTHENTICATED"


def test_read_lease_id_accepts_256_characters() -> None:
    assert read_lease_id(((KEY, "a" * 256), ("other", "x")), KEY) == "a" * 256


def test_refusal_details_never_hold_lease_id() -> None:
    secret = "s3cr3t-lease-id-value"
    with pytest.raises(LeaseMalformed) as caught:
        read_lease_id(((KEY, secret), (KEY, secret)), KEY)

    assert secret not in caught.value.details


def test_lru_drops_least_recently_used() -> None:
    cache: ExpiringLru[str, int] = ExpiringLru(2, None)
    cache.put("a", 1, now=0)
    cache.put("b", 2, now=0)
    assert cache.get("a", now=0) == 1

    cache.put("c", 3, now=0)

    assert cache.get("b", now=0) is None
    assert cache.get("a", now=0) == 1
    assert cache.get("c", now=0) == 3


def test_lru_items_expire() -> None:
    cache: ExpiringLru[str, int] = ExpiringLru(10, 5.0)
    cache.put("a", 1, now=100.0)

    assert cache.get("a", now=104.9) == 1
    assert cache.get("a", now=105.0) is None
    assert len(cache) == 0


def test_rule_book_exact_beats_service_pattern() -> None:
    book = _RuleBook(("/grpc.health.v1.Health/*",))
    exact = MethodRuleInfo("/test.Guarded/ShortOnly", ("short",), None, False)
    service = MethodRuleInfo("/test.Guarded/*", (), 2.0, False)
    book.load_policy(PolicyInfo(tiers=[], rules=[service, exact]))

    assert book.rule_for("/test.Guarded/ShortOnly") == exact
    assert book.rule_for("/test.Guarded/Other") == service
    assert book.rule_for("/test.Other/Any").pattern == ""
    assert book.is_exempt("/grpc.health.v1.Health/Check")


def test_rule_book_without_policy_knows_only_learned_rules() -> None:
    book = _RuleBook(("/grpc.health.v1.Health/*",))
    learned = MethodRuleInfo("", (), None, False)

    assert book.rule_for("/test.Lease/Unary") is None
    book.learn("/test.Lease/Unary", learned)
    assert book.rule_for("/test.Lease/Unary") == learned
    assert book.is_exempt("/grpc.health.v1.Health/Watch")
