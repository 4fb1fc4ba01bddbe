"""Tests of the policy file parser, the duration parser and method rule lookup."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from session_authority.server._policy import (
    DEFAULT_EXEMPT_PATTERNS,
    DEFAULT_RULE,
    Bounds,
    Limits,
    MethodRule,
    Policy,
    PolicyError,
    Tier,
    UnknownTierError,
    format_duration,
    load_policy,
    parse_duration,
    parse_policy,
)

STANDARD = '[tiers.standard]\nidle_timeout = "5m"\nmax_duration = "8h"\n'
SHORT = '[tiers.short]\nidle_timeout = "30s"\nmax_duration = "15m"\n'
DURATION_FORM = re.escape(
    'use a number of seconds or a string of numbers with the units ms, s, m, h or d, such as "250ms", '
    '"30s" or "1h30m"'
)
PATTERN_FORM = re.escape('use "/package.Service/Method" or "/package.Service/*"')

FULL_POLICY = """\
version = 1
default_tier = "standard"
admins = ["ops-admin"]
exempt = ["/grpc.health.v1.Health/*"]

[tiers.standard]
idle_timeout = "5m"
max_duration = "8h"

[tiers.payments]
idle_timeout = "2s"
max_duration = "10s"

[[methods]]
pattern = "/demo.Payments/Transfer"
tiers = ["payments"]
max_session_age = "5s"

[[methods]]
pattern = "/demo.Payments/*"
tiers = ["payments", "standard"]

[bounds]
min_idle_timeout = "1s"
max_idle_timeout = "24h"
min_max_duration = "1s"
max_max_duration = "30d"

[limits]
max_live_leases_per_principal = 10
grants_per_second_per_principal = 2.5
"""


def policy_text(top: str = 'default_tier = "standard"\n', tables: str = STANDARD, version: str = "version = 1\n") -> str:
    """Return a policy file whose top-level keys come before its tables, as TOML requires."""
    return version + top + "\n" + tables


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    return caught.value.problems


# --- parse_duration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
        (-0.0, 0.0),
        ("0s", 0.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("7d", 604800.0),
        ("1d2h3m4s5ms", 93784.005),
        ("1m1m", 120.0),
    ],
)
def test_parse_duration_valid(value: object, seconds: float) -> None:
    assert parse_duration(value, key="k") == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, rf"^tiers\.a\.idle_timeout: duration -1 is negative; {DURATION_FORM}$"),
        (-0.5, r"^tiers\.a\.idle_timeout: duration -0\.5 is negative; "),
        (True, r"^tiers\.a\.idle_timeout: expected a duration, got boolean true; "),
        (None, r"^tiers\.a\.idle_timeout: expected a duration, got NoneType None; "),
        ([1], r"^tiers\.a\.idle_timeout: expected a duration, got an array of 1 items; "),
        (math.inf, r"^tiers\.a\.idle_timeout: duration float inf is not a finite number; "),
        (math.nan, r"^tiers\.a\.idle_timeout: duration float nan is not a finite number; "),
        (10**400, r"^tiers\.a\.idle_timeout: duration integer \(an integer of more than 30 digits\) is not a finite"),
        ("", rf'^tiers\.a\.idle_timeout: invalid duration "": it is empty; {DURATION_FORM}$'),
        ("-5s", r'^tiers\.a\.idle_timeout: invalid duration "-5s": durations cannot be negative; '),
        ("30", r'^tiers\.a\.idle_timeout: invalid duration "30": the number 30 has no unit; '),
        ("5x", rf'^tiers\.a\.idle_timeout: invalid duration "5x": unknown unit "x"; {DURATION_FORM}$'),
        ("5M", r'^tiers\.a\.idle_timeout: invalid duration "5M": unknown unit "M"; '),
        ("1h 30m", r'^tiers\.a\.idle_timeout: invalid duration "1h 30m": unexpected character " " at position 2; '),
        ("s", r'^tiers\.a\.idle_timeout: invalid duration "s": unexpected character "s" at position 0; '),
        ("1,5s", r'^tiers\.a\.idle_timeout: invalid duration "1,5s": unexpected character "," at position 1; '),
        ("\u0661s", r'^tiers\.a\.idle_timeout: invalid duration "\\u0661s": unexpected character '),
        ("inf", r'^tiers\.a\.idle_timeout: invalid duration "inf": unexpected character "i" at position 0; '),
        ("9" * 400 + "s", r'^tiers\.a\.idle_timeout: duration string "9+"\.\.\. is not a finite number; '),
    ],
)
def test_parse_duration_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value, key="tiers.a.idle_timeout")


@given(st.one_of(st.text(), st.from_regex(r"[0-9.]{0,6}(ms|s|m|h|d|x)?", fullmatch=True), st.integers(), st.floats()))
def test_parse_duration_property(value: object) -> None:
    try:
        seconds = parse_duration(value, key="k")
    except ValueError as exc:
        assert str(exc).startswith("k: ")
    else:
        assert isinstance(seconds, float)
        assert math.isfinite(seconds)
        assert seconds >= 0
        assert math.copysign(1.0, seconds) == 1.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0 s"),
        (0.2, "0.2 s"),
        (1.0, "1 s"),
        (59.5, "59.5 s"),
        (60.0, "1 min"),
        (90.0, "1 min 30 s"),
        (90.5, "90.5 s"),
        (5400.0, "1 h 30 min"),
        (86400.0, "24 h"),
        (129600.0, "36 h"),
        (2 * 86400.0, "2 d"),
        (30 * 86400.0, "30 d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- parse_policy: valid files --------------------------------------------------------------


def test_parse_full_policy() -> None:
    policy = parse_policy(FULL_POLICY)

    assert dict(policy.tiers) == {
        "standard": Tier("standard", 300.0, 28800.0),
        "payments": Tier("payments", 2.0, 10.0),
    }
    assert policy.default_tier == "standard"
    assert policy.admins == frozenset({"ops-admin"})
    assert policy.rules == (
        MethodRule("/grpc.health.v1.Health/*", exempt=True),
        MethodRule("/demo.Payments/Transfer", ("payments",), 5.0),
        MethodRule("/demo.Payments/*", ("payments", "standard")),
    )
    assert policy.bounds == Bounds()
    assert policy.limits == Limits(max_live_leases_per_principal=10, grants_per_second_per_principal=2.5)


def test_parse_minimal_policy_uses_defaults() -> None:
    policy = parse_policy(policy_text(top=""))

    assert policy.default_tier == "standard"
    assert policy.admins == frozenset()
    assert policy.watchers is None
    assert policy.rules == tuple(MethodRule(pattern, exempt=True) for pattern in DEFAULT_EXEMPT_PATTERNS)
    assert policy.bounds == Bounds()
    assert policy.limits == Limits()


def test_parse_policy_empty_exempt_list() -> None:
    policy = parse_policy(policy_text(top='default_tier = "standard"\nexempt = []\n'))

    assert policy.rules == ()
    assert not policy.is_exempt("/grpc.health.v1.Health/Check")


def test_parse_policy_exempt_replaces_defaults() -> None:
    policy = parse_policy(policy_text(top='default_tier = "standard"\nexempt = ["/demo.Public/*"]\n'))

    assert policy.is_exempt("/demo.Public/Ping")
    assert not policy.is_exempt("/grpc.health.v1.Health/Check")


def test_parse_policy_single_tier_is_default() -> None:
    policy = parse_policy(policy_text(top="", tables=SHORT))

    assert policy.default_tier == "short"


def test_parse_policy_bounds_widen_tier_range() -> None:
    tables = '[tiers.fast]\nidle_timeout = "200ms"\nmax_duration = "500ms"\n[bounds]\nmin_idle_timeout = "100ms"\nmin_max_duration = "100ms"\n'

    policy = parse_policy(policy_text(top="", tables=tables))

    assert policy.tiers["fast"] == Tier("fast", 0.2, 0.5)
    assert policy.bounds.min_idle_timeout_seconds == pytest.approx(0.1)


def test_parse_policy_method_rule_without_restrictions() -> None:
    tables = STANDARD + '[[methods]]\npattern = "/demo.Payments/Balance"\n'

    policy = parse_policy(policy_text(tables=tables))

    assert policy.rule_for("/demo.Payments/Balance") == MethodRule("/demo.Payments/Balance")


def test_parse_policy_rule_tiers_deduplicated() -> None:
    tables = STANDARD + '[[methods]]\npattern = "/a.B/C"\ntiers = ["standard", "standard"]\n'

    policy = parse_policy(policy_text(tables=tables))

    assert policy.rule_for("/a.B/C").tiers == ("standard",)


def test_parse_policy_package_less_service_pattern() -> None:
    tables = STANDARD + '[[methods]]\npattern = "/Echo/*"\ntiers = ["standard"]\n'

    policy = parse_policy(policy_text(tables=tables))

    assert policy.rule_for("/Echo/Say").pattern == "/Echo/*"


# --- parse_policy: one problem per case -------------------------------------------------------


METHOD = '[[methods]]\npattern = "/a.B/C"\n'

PROBLEM_CASES = [
    # The TOML itself and the version.
    ("toml_syntax", 'version = 1\nadmins = ["a"\n[tiers.x]\n', r"invalid TOML: .*\(at line 3, column \d+\)"),
    ("version_missing", policy_text(version=""), r"version: missing; add `version = 1` at the top of the file"),
    (
        "version_unsupported",
        policy_text(version="version = 2\n"),
        r"version: unsupported policy format version 2; this authority reads version 1",
    ),
    ("version_string", policy_text(version='version = "1"\n'), r'version: expected the integer 1, got string "1"'),
    ("version_boolean", policy_text(version="version = true\n"), r"version: expected the integer 1, got boolean true"),
    ("version_float", policy_text(version="version = 1.0\n"), r"version: expected the integer 1, got float 1\.0"),
    # Unknown keys name the known ones and suggest the closest.
    (
        "unknown_top_level_key",
        policy_text(top='default_tier = "standard"\ntier = "x"\n'),
        r'tier: unknown key; did you mean "tiers"\? known keys: version, default_tier, admins, watchers, exempt, '
        r"tiers, methods, bounds, limits",
    ),
    (
        "unknown_top_level_key_without_suggestion",
        policy_text(top='default_tier = "standard"\nzzz = 1\n'),
        r"zzz: unknown key; known keys: version, default_tier, admins, watchers, exempt, tiers, methods, bounds,"
        r" limits",
    ),
    (
        "unknown_tier_key",
        policy_text(tables=STANDARD + 'idle = "5m"\n'),
        r'tiers\.standard\.idle: unknown key; did you mean "idle_timeout"\? known keys: idle_timeout, max_duration',
    ),
    (
        "unknown_method_key",
        policy_text(tables=STANDARD + METHOD + 'max_age = "1m"\n'),
        r'methods\[0\]\.max_age: unknown key; did you mean "max_session_age"\? known keys: pattern, tiers, '
        r"max_session_age",
    ),
    (
        "unknown_bounds_key",
        policy_text(tables=STANDARD + '[bounds]\nmin_idle = "1s"\n'),
        r'bounds\.min_idle: unknown key; did you mean "min_idle_timeout"\? known keys: min_idle_timeout, '
        r"max_idle_timeout, min_max_duration, max_max_duration",
    ),
    (
        "unknown_limits_key",
        policy_text(tables=STANDARD + "[limits]\nmax_leases = 1\n"),
        r'limits\.max_leases: unknown key; did you mean "max_live_leases_per_principal"\? known keys: '
        r"max_live_leases_per_principal, grants_per_second_per_principal",
    ),
    (
        "unknown_key_quoted_in_path",
        policy_text(tables=STANDARD + '"idle timeout" = "5m"\n'),
        r'tiers\.standard\."idle timeout": unknown key; did you mean "idle_timeout"\? ',
    ),
    # Tiers.
    (
        "tiers_missing",
        policy_text(top="", tables=""),
        r"tiers: missing; add at least one \[tiers\.NAME\] table with idle_timeout and max_duration",
    ),
    (
        "tiers_empty",
        policy_text(top="tiers = {}\n", tables=""),
        r"tiers: no tiers defined; add at least one \[tiers\.NAME\] table with idle_timeout and max_duration",
    ),
    ("tiers_not_table", policy_text(top="tiers = 5\n", tables=""), r"tiers: expected a table of tiers, got integer 5"),
    (
        "tier_not_table",
        policy_text(top="tiers = { standard = 5 }\n", tables=""),
        r"tiers\.standard: expected a table with idle_timeout and max_duration, got integer 5",
    ),
    (
        "tier_name_invalid",
        policy_text(top="", tables='[tiers."gold tier"]\nidle_timeout = "5m"\nmax_duration = "8h"\n'),
        r'tiers\."gold tier": invalid tier name; use 1 to 64 letters, digits, "_" or "-"',
    ),
    (
        "tier_idle_timeout_missing",
        policy_text(tables='[tiers.standard]\nmax_duration = "8h"\n'),
        r'tiers\.standard\.idle_timeout: missing; set it to a duration such as "5m"',
    ),
    (
        "tier_max_duration_missing",
        policy_text(tables='[tiers.standard]\nidle_timeout = "5m"\n'),
        r'tiers\.standard\.max_duration: missing; set it to a duration such as "5m"',
    ),
    (
        "tier_idle_timeout_below_minimum",
        policy_text(tables="[tiers.standard]\nidle_timeout = 0.2\nmax_duration = 10\n"),
        r"tiers\.standard\.idle_timeout: 0\.2 s is below the minimum 1 s \(bounds\.min_idle_timeout\)",
    ),
    (
        "tier_idle_timeout_above_maximum",
        policy_text(tables='[tiers.standard]\nidle_timeout = "2d"\nmax_duration = "3d"\n'),
        r"tiers\.standard\.idle_timeout: 2 d is above the maximum 24 h \(bounds\.max_idle_timeout\)",
    ),
    (
        "tier_max_duration_above_maximum",
        policy_text(tables='[tiers.standard]\nidle_timeout = "5m"\nmax_duration = "31d"\n'),
        r"tiers\.standard\.max_duration: 31 d is above the maximum 30 d \(bounds\.max_max_duration\)",
    ),
    (
        "tier_max_duration_below_minimum",
        policy_text(
            tables='[tiers.standard]\nidle_timeout = "1s"\nmax_duration = "30s"\n[bounds]\nmin_max_duration = "1m"\n'
        ),
        r"tiers\.standard\.max_duration: 30 s is below the minimum 1 min \(bounds\.min_max_duration\)",
    ),
    (
        "tier_max_duration_below_idle_timeout",
        policy_text(tables='[tiers.standard]\nidle_timeout = "5m"\nmax_duration = "1m"\n'),
        r"tiers\.standard\.max_duration: 1 min is below idle_timeout \(5 min\); "
        r"max_duration must be at least idle_timeout",
    ),
    (
        "tier_duration_unknown_unit",
        policy_text(tables='[tiers.standard]\nidle_timeout = "5x"\nmax_duration = "8h"\n'),
        rf'tiers\.standard\.idle_timeout: invalid duration "5x": unknown unit "x"; {DURATION_FORM}',
    ),
    (
        "tier_duration_negative",
        policy_text(tables='[tiers.standard]\nidle_timeout = -1\nmax_duration = "8h"\n'),
        rf"tiers\.standard\.idle_timeout: duration -1 is negative; {DURATION_FORM}",
    ),
    (
        "tier_duration_nan",
        policy_text(tables='[tiers.standard]\nidle_timeout = nan\nmax_duration = "8h"\n'),
        rf"tiers\.standard\.idle_timeout: duration float nan is not a finite number; {DURATION_FORM}",
    ),
    (
        "tier_duration_boolean",
        policy_text(tables='[tiers.standard]\nidle_timeout = true\nmax_duration = "8h"\n'),
        rf"tiers\.standard\.idle_timeout: expected a duration, got boolean true; {DURATION_FORM}",
    ),
    # The default tier.
    (
        "default_tier_unknown",
        policy_text(top='default_tier = "gold"\n', tables=STANDARD + SHORT),
        r'default_tier: tier "gold" is not in the policy; known tiers: short, standard',
    ),
    (
        "default_tier_missing_with_several_tiers",
        policy_text(top="", tables=STANDARD + SHORT),
        r"default_tier: missing; set it to one of: short, standard",
    ),
    (
        "default_tier_not_string",
        policy_text(top="default_tier = 1\n"),
        r"default_tier: expected a tier name, got integer 1",
    ),
    # Admins.
    (
        "admins_not_array",
        policy_text(top='default_tier = "standard"\nadmins = "ops"\n'),
        r'admins: expected an array of principals, got string "ops"',
    ),
    (
        "admin_not_string",
        policy_text(top='default_tier = "standard"\nadmins = ["ops", 3]\n'),
        r"admins\[1\]: expected a principal string, got integer 3",
    ),
    (
        "admin_empty",
        policy_text(top='default_tier = "standard"\nadmins = [""]\n'),
        r'admins\[0\]: invalid principal "": a principal is 1 to 256 printable ASCII characters without whitespace',
    ),
    (
        "admin_with_whitespace",
        policy_text(top='default_tier = "standard"\nadmins = ["ops admin"]\n'),
        r'admins\[0\]: invalid principal "ops admin": a principal is 1 to 256 printable ASCII characters ',
    ),
    (
        "watchers_not_array",
        policy_text(top='default_tier = "standard"\nwatchers = "orders-enforcer"\n'),
        r'watchers: expected an array of principals, got string "orders-enforcer"',
    ),
    (
        "watchers_bad_principal",
        policy_text(top='default_tier = "standard"\nwatchers = ["orders enforcer"]\n'),
        r'watchers\[0\]: invalid principal "orders enforcer": a principal is 1 to 256 printable ASCII characters ',
    ),
    # Exempt patterns.
    (
        "exempt_not_array",
        policy_text(top='default_tier = "standard"\nexempt = "/a.B/*"\n'),
        rf'exempt: expected an array of method patterns, got string "/a\.B/\*"; {PATTERN_FORM}',
    ),
    (
        "exempt_pattern_without_slash",
        policy_text(top='default_tier = "standard"\nexempt = ["grpc.health.v1.Health/*"]\n'),
        rf'exempt\[0\]: "grpc\.health\.v1\.Health/\*" must start with "/"; {PATTERN_FORM}',
    ),
    (
        "exempt_pattern_service_only",
        policy_text(top='default_tier = "standard"\nexempt = ["/grpc.health.v1.Health"]\n'),
        rf'exempt\[0\]: "/grpc\.health\.v1\.Health" is not a method pattern; {PATTERN_FORM}',
    ),
    (
        "exempt_pattern_partial_wildcard",
        policy_text(top='default_tier = "standard"\nexempt = ["/a.B/Get*"]\n'),
        rf'exempt\[0\]: "/a\.B/Get\*" is not a method pattern; {PATTERN_FORM}',
    ),
    (
        "exempt_pattern_wildcard_service",
        policy_text(top='default_tier = "standard"\nexempt = ["/*"]\n'),
        rf'exempt\[0\]: "/\*" is not a method pattern; {PATTERN_FORM}',
    ),
    (
        "exempt_pattern_not_string",
        policy_text(top='default_tier = "standard"\nexempt = [1]\n'),
        rf"exempt\[0\]: expected a method pattern string, got integer 1; {PATTERN_FORM}",
    ),
    (
        "exempt_pattern_duplicate",
        policy_text(top='default_tier = "standard"\nexempt = ["/a.B/*", "/a.B/*"]\n'),
        r'exempt\[1\]: "/a\.B/\*" is listed twice \(first at exempt\[0\]\)',
    ),
    # Method rules.
    ("methods_not_array", policy_text(top='default_tier = "standard"\nmethods = 5\n'), r"methods: expected an array "
     r"of tables \(\[\[methods\]\]\), got integer 5"),
    (
        "method_not_table",
        policy_text(top='default_tier = "standard"\nmethods = [1]\n'),
        r"methods\[0\]: expected a table with pattern and optional tiers and max_session_age, got integer 1",
    ),
    (
        "method_pattern_missing",
        policy_text(tables=STANDARD + '[[methods]]\ntiers = ["standard"]\n'),
        rf"methods\[0\]\.pattern: missing; {PATTERN_FORM}",
    ),
    (
        "method_pattern_without_slash",
        policy_text(tables=STANDARD + '[[methods]]\npattern = "demo.Payments/Transfer"\n'),
        rf'methods\[0\]\.pattern: "demo\.Payments/Transfer" must start with "/"; {PATTERN_FORM}',
    ),
    (
        "method_pattern_extra_segment",
        policy_text(tables=STANDARD + '[[methods]]\npattern = "/demo.Payments/Transfer/x"\n'),
        rf'methods\[0\]\.pattern: "/demo\.Payments/Transfer/x" is not a method pattern; {PATTERN_FORM}',
    ),
    (
        "method_pattern_duplicate",
        policy_text(tables=STANDARD + METHOD + METHOD),
        r'methods\[1\]\.pattern: "/a\.B/C" is already used by methods\[0\]; merge the two rules',
    ),
    (
        "method_pattern_also_exempt",
        policy_text(top='default_tier = "standard"\nexempt = ["/a.B/C"]\n', tables=STANDARD + METHOD),
        r'methods\[0\]\.pattern: "/a\.B/C" is also exempt \(exempt\[0\]\), and exempt methods need no lease; '
        r"remove the method rule or the exempt pattern",
    ),
    (
        "method_pattern_exempt_by_default",
        policy_text(tables=STANDARD + '[[methods]]\npattern = "/grpc.health.v1.Health/*"\n'),
        r'methods\[0\]\.pattern: "/grpc\.health\.v1\.Health/\*" is also exempt \(the default exempt list\), ',
    ),
    (
        "method_tiers_not_array",
        policy_text(tables=STANDARD + METHOD + 'tiers = "standard"\n'),
        r'methods\[0\]\.tiers: expected an array of tier names, got string "standard"',
    ),
    (
        "method_tier_unknown",
        policy_text(tables=STANDARD + SHORT + METHOD + 'tiers = ["short", "gold"]\n'),
        r'methods\[0\]\.tiers\[1\]: tier "gold" is not in the policy; known tiers: short, standard',
    ),
    (
        "method_tier_not_string",
        policy_text(tables=STANDARD + METHOD + "tiers = [1]\n"),
        r"methods\[0\]\.tiers\[0\]: expected a tier name, got integer 1",
    ),
    (
        "max_session_age_zero",
        policy_text(tables=STANDARD + METHOD + "max_session_age = 0\n"),
        r"methods\[0\]\.max_session_age: must be greater than 0 s, got 0 s",
    ),
    (
        "max_session_age_invalid",
        policy_text(tables=STANDARD + METHOD + 'max_session_age = "soon"\n'),
        r'methods\[0\]\.max_session_age: invalid duration "soon": unexpected character "s" at position 0; ',
    ),
    (
        "max_session_age_above_rule_tiers",
        policy_text(tables=STANDARD + SHORT + METHOD + 'tiers = ["short"]\nmax_session_age = "1h"\n'),
        r"methods\[0\]\.max_session_age: 1 h is above the longest max_duration of the tiers this rule allows "
        r'\(15 min, tier "short"\), so it would never refuse a lease; it must be greater than 0 s and at most that',
    ),
    (
        "max_session_age_above_all_tiers",
        policy_text(tables=STANDARD + SHORT + METHOD + 'max_session_age = "9h"\n'),
        r"methods\[0\]\.max_session_age: 9 h is above the longest max_duration of the tiers this rule allows "
        r'\(8 h, tier "standard"\), ',
    ),
    # Bounds.
    (
        "bounds_not_table",
        policy_text(top='default_tier = "standard"\nbounds = 1\n'),
        r"bounds: expected a table of durations, got integer 1",
    ),
    (
        "bounds_minimum_zero",
        policy_text(tables=STANDARD + "[bounds]\nmin_idle_timeout = 0\n"),
        r"bounds\.min_idle_timeout: must be greater than 0 s, got 0 s",
    ),
    (
        "bounds_minimum_above_maximum",
        policy_text(tables=STANDARD + '[bounds]\nmin_max_duration = "31d"\n'),
        r"bounds\.min_max_duration: 31 d is above bounds\.max_max_duration \(30 d\)",
    ),
    (
        "bounds_invalid_duration",
        policy_text(tables=STANDARD + '[bounds]\nmax_idle_timeout = "1y"\n'),
        r'bounds\.max_idle_timeout: invalid duration "1y": unknown unit "y"; ',
    ),
    # Limits.
    (
        "limits_not_table",
        policy_text(top='default_tier = "standard"\nlimits = "none"\n'),
        r'limits: expected a table of limits, got string "none"',
    ),
    (
        "limits_live_leases_negative",
        policy_text(tables=STANDARD + "[limits]\nmax_live_leases_per_principal = -1\n"),
        r"limits\.max_live_leases_per_principal: expected an integer of 0 \(unlimited\) or more, got integer -1",
    ),
    (
        "limits_live_leases_float",
        policy_text(tables=STANDARD + "[limits]\nmax_live_leases_per_principal = 1.5\n"),
        r"limits\.max_live_leases_per_principal: expected an integer of 0 \(unlimited\) or more, got float 1\.5",
    ),
    (
        "limits_grant_rate_negative",
        policy_text(tables=STANDARD + "[limits]\ngrants_per_second_per_principal = -0.5\n"),
        r"limits\.grants_per_second_per_principal: expected a number of 0 \(unlimited\) or more, got float -0\.5",
    ),
    (
        "limits_grant_rate_infinite",
        policy_text(tables=STANDARD + "[limits]\ngrants_per_second_per_principal = inf\n"),
        r"limits\.grants_per_second_per_principal: expected a number of 0 \(unlimited\) or more, got float inf",
    ),
    (
        "limits_grant_rate_string",
        policy_text(tables=STANDARD + '[limits]\ngrants_per_second_per_principal = "100"\n'),
        r'limits\.grants_per_second_per_principal: expected a number of 0 \(unlimited\) or more, got string "100"',
    ),
]


@pytest.mark.parametrize(("text", "problem"), [case[1:] for case in PROBLEM_CASES], ids=[c[0] for c in PROBLEM_CASES])
def test_parse_policy_reports_problem(text: str, problem: str) -> None:
    problems = problems_of(text)

    assert len(problems) == 1, problems
    assert re.match(problem, problems[0]), problems[0]


def test_parse_policy_reports_all_problems_at_once() -> None:
    text = policy_text(
        version="version = 3\n",
        top='default_tier = "gold"\nadmins = [""]\n',
        tables='[tiers.standard]\nidle_timeout = 0.2\nmax_duration = "8h"\n[[methods]]\npattern = "a.B/C"\n',
    )

    problems = problems_of(text)

    assert len(problems) == 5, problems
    assert problems[0].startswith("version: unsupported policy format version 3")
    assert problems[1].startswith("tiers.standard.idle_timeout: 0.2 s is below the minimum 1 s")
    assert problems[2].startswith('default_tier: tier "gold" is not in the policy')
    assert problems[3].startswith('admins[0]: invalid principal ""')
    assert problems[4].startswith('methods[0].pattern: "a.B/C" must start with "/"')


def test_parse_policy_checks_every_tier() -> None:
    tables = '[tiers.a]\nidle_timeout = "0s"\nmax_duration = "1h"\n[tiers.b]\nidle_timeout = "1h"\nmax_duration = "1m"\n'

    problems = problems_of(policy_text(top='default_tier = "a"\n', tables=tables))

    assert problems == [
        "tiers.a.idle_timeout: 0 s is below the minimum 1 s (bounds.min_idle_timeout)",
        "tiers.b.max_duration: 1 min is below idle_timeout (1 h); max_duration must be at least idle_timeout",
    ]


def test_policy_error_prefixes_source() -> None:
    text = policy_text(version="", top='default_tier = "gold"\n')

    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="/etc/session-authority/policy.toml")

    assert str(caught.value).splitlines() == [
        f"/etc/session-authority/policy.toml: {problem}" for problem in caught.value.problems
    ]
    assert len(caught.value.problems) == 2
    assert caught.value.source == "/etc/session-authority/policy.toml"


def test_policy_error_is_value_error() -> None:
    with pytest.raises(ValueError, match=r"^<policy>: version: missing; "):
        parse_policy(policy_text(version=""))


# --- load_policy ------------------------------------------------------------------------------


def test_load_policy_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(FULL_POLICY, encoding="utf-8")

    assert load_policy(path) == parse_policy(FULL_POLICY)


def test_load_policy_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(PolicyError, match=rf"^policy file not found: {re.escape(str(path))}$") as caught:
        load_policy(path)

    assert caught.value.problems == [f"policy file not found: {path}"]


def test_load_policy_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=rf"^cannot read policy file {re.escape(str(tmp_path))}: "):
        load_policy(tmp_path)


def test_load_policy_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(b"version = 1\n# \xff\n")

    with pytest.raises(PolicyError, match=rf"^{re.escape(str(path))}: the file is not valid UTF-8 \(.* at byte 14\)$"):
        load_policy(path)


def test_load_policy_names_file_in_problems(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(policy_text(version=""), encoding="utf-8")

    with pytest.raises(PolicyError, match=rf"^{re.escape(os.fspath(path))}: version: missing; "):
        load_policy(path)


# --- Policy lookups ---------------------------------------------------------------------------


def test_rule_for_exact_pattern_beats_wildcard() -> None:
    policy = parse_policy(FULL_POLICY)

    assert policy.rule_for("/demo.Payments/Transfer").pattern == "/demo.Payments/Transfer"
    assert policy.rule_for("/demo.Payments/Refund").pattern == "/demo.Payments/*"


@pytest.mark.parametrize(
    "method",
    [
        "/demo.PaymentsX/Transfer",
        "/demo/Payments/Transfer",
        "/other.Payments/Transfer",
        "/demo.Payments",
        "demo.Payments/Transfer",
        "",
    ],
)
def test_rule_for_unmatched_method(method: str) -> None:
    policy = parse_policy(FULL_POLICY)

    assert policy.rule_for(method) is DEFAULT_RULE


def test_default_rule_restricts_nothing() -> None:
    assert DEFAULT_RULE == MethodRule(pattern="", tiers=(), max_session_age_seconds=None, exempt=False)


def test_is_exempt() -> None:
    policy = parse_policy(FULL_POLICY)

    assert policy.is_exempt("/grpc.health.v1.Health/Check")
    assert policy.is_exempt("/grpc.health.v1.Health/Watch")
    assert not policy.is_exempt("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert not policy.is_exempt("/demo.Payments/Transfer")


def test_exact_exempt_beats_wildcard_rule() -> None:
    tables = STANDARD + '[[methods]]\npattern = "/demo.Payments/*"\ntiers = ["standard"]\n'
    policy = parse_policy(policy_text(top='default_tier = "standard"\nexempt = ["/demo.Payments/Ping"]\n', tables=tables))

    assert policy.is_exempt("/demo.Payments/Ping")
    assert not policy.is_exempt("/demo.Payments/Transfer")


def test_tier_by_name() -> None:
    policy = parse_policy(FULL_POLICY)

    assert policy.tier("payments") == Tier("payments", 2.0, 10.0)


def test_tier_empty_name_is_default() -> None:
    policy = parse_policy(FULL_POLICY)

    assert policy.tier("") == Tier("standard", 300.0, 28800.0)


def test_tier_unknown_name() -> None:
    policy = parse_policy(FULL_POLICY)

    with pytest.raises(UnknownTierError, match=r'^tier "gold" is not in the policy; known tiers: payments, standard$'):
        policy.tier("gold")


def test_unknown_tier_error_is_value_error() -> None:
    with pytest.raises(ValueError, match=r'^tier "gold" is not'):
        Policy.default().tier("gold")


def test_watchers_list_limits_watching() -> None:
    policy = parse_policy(policy_text(top='default_tier = "standard"\nadmins = ["ops"]\nwatchers = ["orders-enforcer"]\n'))

    assert policy.watchers == frozenset({"orders-enforcer"})
    assert policy.may_watch("orders-enforcer")
    assert policy.may_watch("ops")
    assert not policy.may_watch("svc-a")


def test_empty_watchers_list_leaves_admins() -> None:
    policy = parse_policy(policy_text(top='default_tier = "standard"\nadmins = ["ops"]\nwatchers = []\n'))

    assert policy.may_watch("ops")
    assert not policy.may_watch("orders-enforcer")


def test_without_watchers_everyone_watches() -> None:
    assert Policy.default().may_watch("svc-a")


def test_is_admin() -> None:
    policy = parse_policy(FULL_POLICY)

    assert policy.is_admin("ops-admin")
    assert not policy.is_admin("ops-admin2")
    assert not policy.is_admin("")


def test_policy_is_immutable() -> None:
    policy = parse_policy(FULL_POLICY)

    with pytest.raises(AttributeError):
        policy.default_tier = "payments"  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.tiers["gold"] = Tier("gold", 1.0, 2.0)  # type: ignore[index]


def test_policy_constructor_rejects_unknown_default_tier() -> None:
    with pytest.raises(UnknownTierError, match=r'^tier "gold" is not in the policy; known tiers: a$'):
        Policy(tiers={"a": Tier("a", 1.0, 2.0)}, rules=(), default_tier="gold")


def test_policy_constructor_rejects_duplicate_pattern() -> None:
    rules = (MethodRule("/a.B/*", exempt=True), MethodRule("/a.B/*", tiers=("a",)))

    with pytest.raises(ValueError, match=r'^method pattern "/a\.B/\*" appears in more than one rule$'):
        Policy(tiers={"a": Tier("a", 1.0, 2.0)}, rules=rules, default_tier="a")


# --- Policy.default ---------------------------------------------------------------------------


def test_default_policy_tiers() -> None:
    policy = Policy.default()

    assert dict(policy.tiers) == {
        "standard": Tier("standard", 300.0, 8 * 3600.0),
        "short": Tier("short", 30.0, 900.0),
    }
    assert policy.default_tier == "standard"


def test_default_policy_exempts_health_and_reflection() -> None:
    policy = Policy.default()

    assert policy.is_exempt("/grpc.health.v1.Health/Check")
    assert policy.is_exempt("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert policy.is_exempt("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not policy.is_exempt("/demo.Payments/Transfer")


def test_default_policy_has_no_admins() -> None:
    assert Policy.default().admins == frozenset()


def test_default_policy_equals_equivalent_file() -> None:
    text = policy_text(tables=STANDARD + SHORT)

    assert parse_policy(text) == Policy.default()


# --- Property tests ---------------------------------------------------------------------------

TOML_VALUES = st.one_of(
    st.sampled_from(['"5m"', '"250ms"', '"1h30m"', '"x"', '""', "0", "1", "-1", "0.5", "nan", "inf", "true"]),
    st.sampled_from(["[]", '["standard"]', '["/a.B/*"]', "[1, 2]", "{}", '{ idle_timeout = "1s" }', "1979-05-27"]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(str),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12).map(
        lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ),
)
TOML_KEYS = st.sampled_from(
    [
        "version",
        "default_tier",
        "admins",
        "exempt",
        "tiers",
        "methods",
        "idle_timeout",
        "max_duration",
        "pattern",
        "max_session_age",
        "min_idle_timeout",
        "max_live_leases_per_principal",
        "grants_per_second_per_principal",
        "unknown",
    ]
)
TOML_LINES = st.one_of(
    st.builds(lambda key, value: f"{key} = {value}", TOML_KEYS, TOML_VALUES),
    st.sampled_from(
        [
            "[tiers.standard]",
            "[tiers.short]",
            '[tiers."a b"]',
            "[[methods]]",
            "[bounds]",
            "[limits]",
            "[tiers]",
            "version = 1",
            'default_tier = "standard"',
        ]
    ),
    st.text(max_size=20),
)


@given(st.lists(TOML_LINES, max_size=25).map("\n".join))
def test_parse_policy_toml_like_text_property(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicyError as exc:
        assert exc.problems
        assert all(isinstance(problem, str) and problem for problem in exc.problems)
    else:
        assert isinstance(policy, Policy)
        assert policy.default_tier in policy.tiers


@given(st.text())
def test_parse_policy_arbitrary_text_property(text: str) -> None:
    try:
        parse_policy(text)
    except PolicyError as exc:
        assert exc.problems


VALID_DURATIONS = st.sampled_from(['"5m"', '"30s"', '"8h"', '"15m"', '"1h30m"', "60", "1.5", '"2s"'])
INVALID_DURATIONS = st.one_of(
    st.sampled_from(['"250ms"', '"1x"', '""', "0", "-1", "nan", "true", '"31d"']),
    st.floats().map(repr),
)
# Each key has a strategy of plausible values and one of values likely to be rejected.
KEY_VALUES: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]] = {
    "version": (st.just("1"), st.sampled_from(["2", '"1"', "1.0"])),
    "default_tier": (st.sampled_from(['"standard"', '"short"']), st.sampled_from(['"gold"', "1"])),
    "admins": (st.sampled_from(["[]", '["ops-admin"]']), st.sampled_from(['[""]', '["a b"]', '"ops"', "[1]"])),
    "exempt": (st.sampled_from(["[]", '["/a.B/*"]']), st.sampled_from(['["/a.B/C", "/a.B/C"]', '["a.B/*"]', '"x"'])),
    "idle_timeout": (VALID_DURATIONS, INVALID_DURATIONS),
    "max_duration": (VALID_DURATIONS, INVALID_DURATIONS),
    "pattern": (
        st.sampled_from(['"/a.B/C"', '"/a.B/*"', '"/c.D/E"']),
        st.sampled_from(['"a.B/C"', '"/a.B"', '"/grpc.health.v1.Health/*"', "1"]),
    ),
    "tiers": (st.sampled_from(['["standard"]', '["short"]', "[]"]), st.sampled_from(['["gold"]', '"standard"', "[1]"])),
    "max_session_age": (VALID_DURATIONS, INVALID_DURATIONS),
    "min_idle_timeout": (st.sampled_from(['"1s"', '"100ms"']), INVALID_DURATIONS),
    "max_idle_timeout": (st.sampled_from(['"24h"', '"2d"']), INVALID_DURATIONS),
    "min_max_duration": (st.sampled_from(['"1s"', '"100ms"']), INVALID_DURATIONS),
    "max_max_duration": (st.sampled_from(['"30d"', '"60d"']), INVALID_DURATIONS),
    "max_live_leases_per_principal": (st.integers(0, 10**6).map(str), st.sampled_from(["-1", "1.5", '"x"'])),
    "grants_per_second_per_principal": (
        st.floats(min_value=0, max_value=1e6).map(repr),
        st.sampled_from(["-1", "inf", "nan", '"x"']),
    ),
}
# Keys written in every section of their kind, then keys that each section may add.
REQUIRED_KEYS = {
    "": ["version"],
    "[tiers.standard]": ["idle_timeout", "max_duration"],
    "[tiers.short]": ["idle_timeout", "max_duration"],
    "[[methods]]": ["pattern"],
    "[bounds]": [],
    "[limits]": [],
}
OPTIONAL_KEYS = {
    "": ["default_tier", "admins", "exempt"],
    "[tiers.standard]": [],
    "[tiers.short]": [],
    "[[methods]]": ["tiers", "max_session_age"],
    "[bounds]": ["min_idle_timeout", "max_idle_timeout", "min_max_duration", "max_max_duration"],
    "[limits]": ["max_live_leases_per_principal", "grants_per_second_per_principal"],
}


@st.composite
def policy_files(draw: st.DrawFn) -> str:
    """Draw well-formed TOML with the policy's structure and mostly plausible values."""
    optional_sections = st.lists(st.sampled_from(list(REQUIRED_KEYS)[2:]), max_size=5)
    headers = ["", "[tiers.standard]"] + draw(optional_sections)
    lines: list[str] = []
    seen: set[str] = set()
    for header in headers:
        if header in seen and header != "[[methods]]":
            continue
        seen.add(header)
        if header:
            lines.append(header)
        keys = list(REQUIRED_KEYS[header])
        if OPTIONAL_KEYS[header]:
            keys += draw(st.lists(st.sampled_from(OPTIONAL_KEYS[header]), unique=True))
        for key in keys:
            valid, invalid = KEY_VALUES[key]
            plausible = draw(st.integers(0, 19)) > 0
            lines.append(f"{key} = {draw(valid if plausible else invalid)}")
        if draw(st.integers(0, 19)) == 0:
            lines.append("typo = 1")
    return "\n".join(lines) + "\n"


@given(policy_files())
def test_parse_policy_structured_files_property(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicyError as exc:
        assert exc.problems
        assert not any(problem.startswith("invalid TOML") for problem in exc.problems)
    else:
        assert policy.default_tier in policy.tiers
        for tier in policy.tiers.values():
            assert 0 < tier.idle_timeout_seconds <= tier.max_duration_seconds
