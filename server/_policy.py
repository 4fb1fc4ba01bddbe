"""The policy file: tiers, per-method rules, exempt methods, bounds and per-principal limits."""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._auth import principal_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

POLICY_FORMAT_VERSION = 1
"""The only ``version`` a policy file may declare."""

DEFAULT_EXEMPT_PATTERNS: tuple[str, ...] = (
    "/grpc.health.v1.Health/*",
    "/grpc.reflection.v1.ServerReflection/*",
    "/grpc.reflection.v1alpha.ServerReflection/*",
)
"""Methods that need no lease unless the policy file sets ``exempt`` itself."""

_TOP_LEVEL_KEYS = ("version", "default_tier", "admins", "watchers", "exempt", "tiers", "methods", "bounds", "limits")
_TIER_KEYS = ("idle_timeout", "max_duration")
_METHOD_KEYS = ("pattern", "tiers", "max_session_age")
_BOUNDS_KEYS = ("min_idle_timeout", "max_idle_timeout", "min_max_duration", "max_max_duration")
_LIMITS_KEYS = ("max_live_leases_per_principal", "grants_per_second_per_principal")

_DURATION_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)")
_DURATION_FORM = (
    'use a number of seconds or a string of numbers with the units ms, s, m, h or d, such as "250ms", '
    '"30s" or "1h30m"'
)

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_METHOD_PATTERN = re.compile(rf"/{_IDENTIFIER}(?:\.{_IDENTIFIER})*/(?:{_IDENTIFIER}|\*)")
_PATTERN_FORM = 'use "/package.Service/Method" or "/package.Service/*"'
_TIER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MAX_QUOTED_LENGTH = 80
_MAX_TOML_INTEGER = 2**63 - 1


class PolicyError(ValueError):
    """A policy file that cannot be used, with every problem found in it.

    Attributes:
        problems: One message per problem, each naming the key path, the value and the rule.
        source: The file the problems are in, or None when there is no file to name.
    """

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        if source is None:
            message = "\n".join(self.problems)
        else:
            message = "\n".join(f"{source}: {problem}" for problem in self.problems)
        super().__init__(message)


class UnknownTierError(ValueError):
    """A tier name that the policy does not define.

    Attributes:
        name: The requested tier name.
        known: The names of the tiers the policy defines, sorted.
    """

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = tuple(known)
        super().__init__(f"tier {_quote(name)} is not in the policy; known tiers: {', '.join(self.known)}")


@dataclass(frozen=True, slots=True)
class Tier:
    """A named risk tier: how long a lease may stay idle and how long it may live at most."""

    name: str
    idle_timeout_seconds: float
    max_duration_seconds: float


@dataclass(frozen=True, slots=True)
class MethodRule:
    """The requirements that a method pattern places on the lease a call carries.

    The rule with an empty pattern is the default rule, which applies when no pattern matches
    and restricts nothing.

    Attributes:
        pattern: ``/package.Service/Method`` or ``/package.Service/*``, or empty for the default rule.
        tiers: When non-empty, the lease's tier must be one of these.
        max_session_age_seconds: When set, leases older than this are refused for matching methods.
        exempt: Calls to matching methods need no lease and do not count as activity.
    """

    pattern: str
    tiers: tuple[str, ...] = ()
    max_session_age_seconds: float | None = None
    exempt: bool = False


DEFAULT_RULE = MethodRule(pattern="")
"""The rule for methods that no pattern of the policy matches: no restriction."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """The range that every tier's idle timeout and max duration must fall in, in seconds."""

    min_idle_timeout_seconds: float = 1.0
    max_idle_timeout_seconds: float = 24 * 3600.0
    min_max_duration_seconds: float = 1.0
    max_max_duration_seconds: float = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-principal limits that the authority enforces. A limit of 0 means unlimited."""

    max_live_leases_per_principal: int = 1000
    grants_per_second_per_principal: float = 100.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The tiers, method rules and admins in force.

    A Policy is immutable, so any thread or event loop may read it without locking.

    Attributes:
        tiers: Tiers by name, in the order the file declares them.
        rules: Exempt patterns (``exempt=True``) and method rules. No pattern appears twice.
        default_tier: The tier used when a grant names none. It is a key of ``tiers``.
        admins: Principals that may list all leases and revoke leases of other principals.
        watchers: Principals besides the admins that may watch session ends,
            which name every principal's leases; None lets every
            authenticated principal watch.
        bounds: The range that tier timeouts were checked against.
        limits: Per-principal limits.
    """

    tiers: Mapping[str, Tier]
    rules: tuple[MethodRule, ...]
    default_tier: str
    admins: frozenset[str] = frozenset()
    watchers: frozenset[str] | None = None
    bounds: Bounds = field(default_factory=Bounds)
    limits: Limits = field(default_factory=Limits)
    _rules_by_method: dict[str, MethodRule] = field(init=False, repr=False, compare=False)
    _rules_by_service: dict[str, MethodRule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", types.MappingProxyType(dict(self.tiers)))
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "admins", frozenset(self.admins))
        if self.watchers is not None:
            object.__setattr__(self, "watchers", frozenset(self.watchers))
        if self.default_tier not in self.tiers:
            raise UnknownTierError(self.default_tier, sorted(self.tiers))

        # rule_for runs on every call an enforcer handles, so it is two dictionary lookups. The
        # exact method comes first, then "/package.Service" for the wildcard.
        by_method: dict[str, MethodRule] = {}
        by_service: dict[str, MethodRule] = {}
        for rule in self.rules:
            if rule.pattern.endswith("/*"):
                index, key = by_service, rule.pattern[:-2]
            else:
                index, key = by_method, rule.pattern
            if key in index:
                raise ValueError(f"method pattern {_quote(rule.pattern)} appears in more than one rule")
            index[key] = rule
        object.__setattr__(self, "_rules_by_method", by_method)
        object.__setattr__(self, "_rules_by_service", by_service)

    @classmethod
    def default(cls) -> Policy:
        """Return the built-in policy used when no policy file is given.

        It has the default tier ``standard`` (idle timeout 5 min, max duration 8 h), the tier
        ``short`` (idle timeout 30 s, max duration 15 min), no admins and the default exempt
        patterns.
        """
        tiers = (
            Tier("standard", idle_timeout_seconds=300.0, max_duration_seconds=8 * 3600.0),
            Tier("short", idle_timeout_seconds=30.0, max_duration_seconds=900.0),
        )
        return cls(
            tiers={tier.name: tier for tier in tiers},
            rules=tuple(MethodRule(pattern, exempt=True) for pattern in DEFAULT_EXEMPT_PATTERNS),
            default_tier="standard",
        )

    def tier(self, name: str) -> Tier:
        """Return the tier called ``name``, or the default tier when ``name`` is empty.

        Raises:
            UnknownTierError: The policy has no tier of that name.
        """
        if not name:
            return self.tiers[self.default_tier]
        tier = self.tiers.get(name)
        if tier is None:
            raise UnknownTierError(name, sorted(self.tiers))
        return tier

    def rule_for(self, method: str) -> MethodRule:
        """Return the rule for a full method name such as ``/package.Service/Method``.

        An exact pattern takes precedence over the service's ``/package.Service/*`` pattern.
        When no pattern matches, the result is ``DEFAULT_RULE``, which restricts nothing.
        """
        rule = self._rules_by_method.get(method)
        if rule is not None:
            return rule
        service, slash, _ = method.rpartition("/")
        if slash:
            rule = self._rules_by_service.get(service)
            if rule is not None:
                return rule
        return DEFAULT_RULE

    def is_exempt(self, method: str) -> bool:
        """Return whether calls to ``method`` need no lease."""
        return self.rule_for(method).exempt

    def is_admin(self, principal: str) -> bool:
        """Return whether ``principal`` may list all leases and revoke those of others."""
        return principal in self.admins

    def may_watch(self, principal: str) -> bool:
        """Return whether ``principal`` may watch session ends: any principal without a watchers list."""
        return self.watchers is None or principal in self.watchers or principal in self.admins


def parse_duration(value: object, *, key: str) -> float:
    """Convert a policy duration to seconds.

    A duration is a non-negative number of seconds, or a string of one or more numbers with
    units (``ms``, ``s``, ``m``, ``h``, ``d``), such as ``"250ms"``, ``"1.5h"`` or ``"1h30m"``.

    Args:
        value: The value read from the policy file.
        key: The key path of the value, used in the error message.

    Returns:
        The duration in seconds, finite and at least 0.

    Raises:
        ValueError: The value is not a duration. The message names the key, the value and the
            accepted form.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{key}: expected a duration, got {_describe(value)}; {_DURATION_FORM}")

    if isinstance(value, str):
        seconds = _parse_duration_text(value, key=key)
    else:
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if seconds < 0:
            raise ValueError(f"{key}: duration {_describe_number(value)} is negative; {_DURATION_FORM}")

    if not math.isfinite(seconds):
        raise ValueError(f"{key}: duration {_describe(value)} is not a finite number; {_DURATION_FORM}")
    # Normalise -0.0, which passes the sign check above.
    return seconds if seconds != 0 else 0.0


def _parse_duration_text(text: str, *, key: str) -> float:
    invalid = f"{key}: invalid duration {_quote(text)}"
    if not text:
        raise ValueError(f"{invalid}: it is empty; {_DURATION_FORM}")
    if text.startswith("-"):
        raise ValueError(f"{invalid}: durations cannot be negative; {_DURATION_FORM}")

    seconds = 0.0
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(
                f"{invalid}: unexpected character {_quote(text[position])} at position {position}; {_DURATION_FORM}"
            )
        number, unit = match.groups()
        position = match.end()
        if not unit and position < len(text):
            raise ValueError(
                f"{invalid}: unexpected character {_quote(text[position])} at position {position}; {_DURATION_FORM}"
            )
        if not unit:
            raise ValueError(f"{invalid}: the number {number} has no unit; {_DURATION_FORM}")
        if unit not in _DURATION_UNIT_SECONDS:
            raise ValueError(f"{invalid}: unknown unit {_quote(unit)}; {_DURATION_FORM}")
        seconds += float(number) * _DURATION_UNIT_SECONDS[unit]
    return seconds


def format_duration(seconds: float) -> str:
    """Format seconds for messages, such as ``"0.2 s"``, ``"1 h 30 min"`` or ``"7 d"``."""
    if not math.isfinite(seconds) or seconds < 60 or not float(seconds).is_integer():
        return f"{seconds:.15g} s"
    whole = int(seconds)
    if whole % 86400 == 0 and whole >= 2 * 86400:
        return f"{whole // 86400} d"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{count} {unit}" for count, unit in ((hours, "h"), (minutes, "min"), (secs, "s")) if count]
    return " ".join(parts)


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    """Parse the text of a TOML policy file.

    Args:
        text: The file's text.
        source: The file name used to prefix each line of the error message.

    Returns:
        The policy.

    Raises:
        PolicyError: The text is not a valid policy. ``problems`` lists every problem found,
            not only the first.
    """
    try:
        document = tomllib.loads(text)
    except ValueError as exc:
        # TOMLDecodeError is a ValueError, and so is an integer with more digits than the
        # interpreter converts. The TOML message names the line and column.
        raise PolicyError([f"invalid TOML: {exc}"], source) from exc
    except RecursionError as exc:
        raise PolicyError(["invalid TOML: arrays or tables are nested too deeply"], source) from exc

    parser = _PolicyParser()
    policy = parser.parse(document)
    if parser.problems or policy is None:
        raise PolicyError(parser.problems, source)
    return policy


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and parse a TOML policy file.

    Raises:
        PolicyError: The file is missing, unreadable or not a valid policy.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = file.read()
    except FileNotFoundError as exc:
        raise PolicyError([f"policy file not found: {source}"]) from exc
    except OSError as exc:
        raise PolicyError([f"cannot read policy file {source}: {exc.strerror or exc}"]) from exc

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError([f"the file is not valid UTF-8 ({exc.reason} at byte {exc.start})"], source) from exc
    return parse_policy(text, source=source)


class _PolicyParser:
    """Checks a decoded TOML document and collects one message per problem."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def parse(self, document: dict[str, Any]) -> Policy | None:
        self._check_keys(document, _TOP_LEVEL_KEYS, path="")
        self._check_version(document)
        bounds = self._parse_bounds(document.get("bounds"))
        limits = self._parse_limits(document.get("limits"))
        declared_tiers, tiers = self._parse_tiers(document.get("tiers"), bounds)
        default_tier = self._parse_default_tier(document, declared_tiers)
        admins = self._parse_principals(document.get("admins", []), "admins")
        watchers = self._parse_principals(document["watchers"], "watchers") if "watchers" in document else None
        exempt_rules, rule_paths = self._parse_exempt(document)
        method_rules = self._parse_methods(document.get("methods", []), declared_tiers, tiers, rule_paths)

        if self.problems or default_tier is None:
            return None
        return Policy(
            tiers=tiers,
            rules=exempt_rules + method_rules,
            default_tier=default_tier,
            admins=admins,
            watchers=watchers,
            bounds=bounds,
            limits=limits,
        )

    def _add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def _check_keys(self, table: Mapping[str, Any], known: Sequence[str], *, path: str) -> None:
        for key in table:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            suggestion = f"did you mean {_quote(close[0])}? " if close else ""
            self._add(_key_path(path, key), f"unknown key; {suggestion}known keys: {', '.join(known)}")

    def _table(self, value: object, path: str, what: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self._add(path, f"expected {what}, got {_describe(value)}")
        return None

    def _check_version(self, document: Mapping[str, Any]) -> None:
        if "version" not in document:
            self._add("version", f"missing; add `version = {POLICY_FORMAT_VERSION}` at the top of the file")
            return
        version = document["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            self._add("version", f"expected the integer {POLICY_FORMAT_VERSION}, got {_describe(version)}")
        elif version != POLICY_FORMAT_VERSION:
            self._add(
                "version",
                f"unsupported policy format version {_describe_number(version)}; "
                f"this authority reads version {POLICY_FORMAT_VERSION}",
            )

    def _duration(self, table: Mapping[str, Any], key: str, path: str) -> float | None:
        try:
            return parse_duration(table[key], key=_key_path(path, key))
        except ValueError as exc:
            self.problems.append(str(exc))
            return None

    def _parse_bounds(self, value: object) -> Bounds:
        defaults = Bounds()
        if value is None:
            return defaults
        table = self._table(value, "bounds", "a table of durations")
        if table is None:
            return defaults
        self._check_keys(table, _BOUNDS_KEYS, path="bounds")

        seconds: dict[str, float] = {}
        for key in _BOUNDS_KEYS:
            default = getattr(defaults, f"{key}_seconds")
            parsed = self._duration(table, key, "bounds") if key in table else default
            seconds[key] = default if parsed is None else parsed

        # A pair that contradicts itself falls back to the defaults so that the tiers can
        # still be checked against something sensible.
        for low, high in (("min_idle_timeout", "max_idle_timeout"), ("min_max_duration", "max_max_duration")):
            problem = None
            if seconds[low] <= 0:
                problem = f"must be greater than 0 s, got {format_duration(seconds[low])}"
            elif seconds[low] > seconds[high]:
                problem = f"{format_duration(seconds[low])} is above bounds.{high} ({format_duration(seconds[high])})"
            if problem is not None:
                self._add(f"bounds.{low}", problem)
                seconds[low] = getattr(defaults, f"{low}_seconds")
                seconds[high] = getattr(defaults, f"{high}_seconds")
        return Bounds(**{f"{key}_seconds": seconds[key] for key in _BOUNDS_KEYS})

    def _parse_limits(self, value: object) -> Limits:
        defaults = Limits()
        if value is None:
            return defaults
        table = self._table(value, "limits", "a table of limits")
        if table is None:
            return defaults
        self._check_keys(table, _LIMITS_KEYS, path="limits")

        max_live_leases = table.get("max_live_leases_per_principal", defaults.max_live_leases_per_principal)
        if not _is_limit(max_live_leases, integer=True):
            self._add(
                "limits.max_live_leases_per_principal",
                f"expected an integer of 0 (unlimited) or more, got {_describe(max_live_leases)}",
            )
            max_live_leases = defaults.max_live_leases_per_principal

        grant_rate = table.get("grants_per_second_per_principal", defaults.grants_per_second_per_principal)
        if not _is_limit(grant_rate, integer=False):
            self._add(
                "limits.grants_per_second_per_principal",
                f"expected a number of 0 (unlimited) or more, got {_describe(grant_rate)}",
            )
            grant_rate = defaults.grants_per_second_per_principal
        return Limits(max_live_leases, float(grant_rate))

    def _parse_tiers(self, value: object, bounds: Bounds) -> tuple[set[str], dict[str, Tier]]:
        """Return the names declared (valid or not) and the tiers that are valid."""
        declared: set[str] = set()
        tiers: dict[str, Tier] = {}
        add_tier = "add at least one [tiers.NAME] table with idle_timeout and max_duration"
        if value is None:
            self._add("tiers", f"missing; {add_tier}")
            return declared, tiers
        table = self._table(value, "tiers", "a table of tiers")
        if table is None:
            return declared, tiers
        if not table:
            self._add("tiers", f"no tiers defined; {add_tier}")
            return declared, tiers

        for name, tier_value in table.items():
            declared.add(name)
            tier = self._parse_tier(name, tier_value, bounds)
            if tier is not None:
                tiers[name] = tier
        return declared, tiers

    def _parse_tier(self, name: str, value: object, bounds: Bounds) -> Tier | None:
        path = _key_path("tiers", name)
        valid = True
        if not _TIER_NAME.fullmatch(name):
            self._add(path, 'invalid tier name; use 1 to 64 letters, digits, "_" or "-"')
            valid = False
        table = self._table(value, path, "a table with idle_timeout and max_duration")
        if table is None:
            return None
        self._check_keys(table, _TIER_KEYS, path=path)

        seconds: dict[str, float | None] = {}
        ranges = {
            "idle_timeout": (bounds.min_idle_timeout_seconds, bounds.max_idle_timeout_seconds),
            "max_duration": (bounds.min_max_duration_seconds, bounds.max_max_duration_seconds),
        }
        for key in _TIER_KEYS:
            if key not in table:
                self._add(_key_path(path, key), 'missing; set it to a duration such as "5m"')
                seconds[key] = None
                continue
            parsed = self._duration(table, key, path)
            if parsed is not None and not self._check_bounds(_key_path(path, key), key, parsed, *ranges[key]):
                parsed = None
            seconds[key] = parsed

        idle_timeout, max_duration = seconds["idle_timeout"], seconds["max_duration"]
        if idle_timeout is None or max_duration is None:
            return None
        if max_duration < idle_timeout:
            self._add(
                _key_path(path, "max_duration"),
                f"{format_duration(max_duration)} is below idle_timeout ({format_duration(idle_timeout)}); "
                "max_duration must be at least idle_timeout",
            )
            return None
        return Tier(name, idle_timeout, max_duration) if valid else None

    def _check_bounds(self, path: str, key: str, seconds: float, minimum: float, maximum: float) -> bool:
        if seconds < minimum:
            self._add(
                path, f"{format_duration(seconds)} is below the minimum {format_duration(minimum)} (bounds.min_{key})"
            )
            return False
        if seconds > maximum:
            self._add(
                path, f"{format_duration(seconds)} is above the maximum {format_duration(maximum)} (bounds.max_{key})"
            )
            return False
        return True

    def _parse_default_tier(self, document: Mapping[str, Any], declared_tiers: set[str]) -> str | None:
        if "default_tier" not in document:
            if len(declared_tiers) == 1:
                return next(iter(declared_tiers))
            if declared_tiers:
                self._add("default_tier", f"missing; set it to one of: {', '.join(sorted(declared_tiers))}")
            return None

        name = document["default_tier"]
        if not isinstance(name, str):
            self._add("default_tier", f"expected a tier name, got {_describe(name)}")
            return None
        if name not in declared_tiers:
            known = ", ".join(sorted(declared_tiers)) or "none"
            self._add("default_tier", f"tier {_quote(name)} is not in the policy; known tiers: {known}")
            return None
        return name

    def _parse_principals(self, value: object, key: str) -> frozenset[str]:
        if not isinstance(value, list):
            self._add(key, f"expected an array of principals, got {_describe(value)}")
            return frozenset()
        principals: set[str] = set()
        for index, principal in enumerate(value):
            path = f"{key}[{index}]"
            if not isinstance(principal, str):
                self._add(path, f"expected a principal string, got {_describe(principal)}")
                continue
            problem = principal_error(principal)
            if problem is not None:
                self._add(path, problem)
                continue
            principals.add(principal)
        return frozenset(principals)

    def _pattern(self, value: object, path: str) -> str | None:
        if not isinstance(value, str):
            self._add(path, f"expected a method pattern string, got {_describe(value)}; {_PATTERN_FORM}")
            return None
        if not value.startswith("/"):
            self._add(path, f'{_quote(value)} must start with "/"; {_PATTERN_FORM}')
            return None
        if not _METHOD_PATTERN.fullmatch(value):
            self._add(path, f"{_quote(value)} is not a method pattern; {_PATTERN_FORM}")
            return None
        return value

    def _parse_exempt(self, document: Mapping[str, Any]) -> tuple[tuple[MethodRule, ...], dict[str, str]]:
        """Return the exempt rules and, for each pattern, where it was declared."""
        rule_paths: dict[str, str] = {}
        if "exempt" not in document:
            for pattern in DEFAULT_EXEMPT_PATTERNS:
                rule_paths[pattern] = "the default exempt list"
            return tuple(MethodRule(p, exempt=True) for p in DEFAULT_EXEMPT_PATTERNS), rule_paths

        value = document["exempt"]
        if not isinstance(value, list):
            self._add("exempt", f"expected an array of method patterns, got {_describe(value)}; {_PATTERN_FORM}")
            return (), rule_paths
        rules: list[MethodRule] = []
        for index, item in enumerate(value):
            path = f"exempt[{index}]"
            pattern = self._pattern(item, path)
            if pattern is None:
                continue
            if pattern in rule_paths:
                self._add(path, f"{_quote(pattern)} is listed twice (first at {rule_paths[pattern]})")
                continue
            rule_paths[pattern] = path
            rules.append(MethodRule(pattern, exempt=True))
        return tuple(rules), rule_paths

    def _parse_methods(
        self,
        value: object,
        declared_tiers: set[str],
        tiers: Mapping[str, Tier],
        rule_paths: dict[str, str],
    ) -> tuple[MethodRule, ...]:
        if not isinstance(value, list):
            self._add("methods", f"expected an array of tables ([[methods]]), got {_describe(value)}")
            return ()
        rules: list[MethodRule] = []
        for index, item in enumerate(value):
            rule = self._parse_method(f"methods[{index}]", item, declared_tiers, tiers, rule_paths)
            if rule is not None:
                rules.append(rule)
        return tuple(rules)

    def _parse_method(
        self,
        path: str,
        value: object,
        declared_tiers: set[str],
        tiers: Mapping[str, Tier],
        rule_paths: dict[str, str],
    ) -> MethodRule | None:
        table = self._table(value, path, "a table with pattern and optional tiers and max_session_age")
        if table is None:
            return None
        self._check_keys(table, _METHOD_KEYS, path=path)
        problems_before = len(self.problems)

        pattern = None
        if "pattern" not in table:
            self._add(f"{path}.pattern", f"missing; {_PATTERN_FORM}")
        else:
            pattern = self._pattern(table["pattern"], f"{path}.pattern")
        if pattern is not None and pattern in rule_paths:
            other = rule_paths[pattern]
            if other.startswith("methods["):
                self._add(f"{path}.pattern", f"{_quote(pattern)} is already used by {other}; merge the two rules")
            else:
                self._add(
                    f"{path}.pattern",
                    f"{_quote(pattern)} is also exempt ({other}), and exempt methods need no lease; "
                    "remove the method rule or the exempt pattern",
                )
            pattern = None
        elif pattern is not None:
            rule_paths[pattern] = path

        rule_tiers = self._parse_rule_tiers(table.get("tiers", []), f"{path}.tiers", declared_tiers)
        max_session_age = None
        if "max_session_age" in table:
            max_session_age = self._parse_max_session_age(table, path, rule_tiers, tiers)

        if pattern is None or len(self.problems) > problems_before:
            return None
        return MethodRule(pattern, rule_tiers, max_session_age)

    def _parse_rule_tiers(self, value: object, path: str, declared_tiers: set[str]) -> tuple[str, ...]:
        if not isinstance(value, list):
            self._add(path, f"expected an array of tier names, got {_describe(value)}")
            return ()
        names: list[str] = []
        known = ", ".join(sorted(declared_tiers)) or "none"
        for index, name in enumerate(value):
            if not isinstance(name, str):
                self._add(f"{path}[{index}]", f"expected a tier name, got {_describe(name)}")
            elif name not in declared_tiers:
                self._add(f"{path}[{index}]", f"tier {_quote(name)} is not in the policy; known tiers: {known}")
            elif name not in names:
                names.append(name)
        return tuple(names)

    def _parse_max_session_age(
        self,
        table: Mapping[str, Any],
        path: str,
        rule_tiers: tuple[str, ...],
        tiers: Mapping[str, Tier],
    ) -> float | None:
        key = _key_path(path, "max_session_age")
        seconds = self._duration(table, "max_session_age", path)
        if seconds is None:
            return None
        if seconds <= 0:
            self._add(key, f"must be greater than 0 s, got {format_duration(seconds)}")
            return None

        # A limit above every allowed tier's max duration can never refuse a lease, which
        # is almost certainly a unit mistake, so it is reported rather than accepted.
        allowed = [tiers[name] for name in rule_tiers if name in tiers] if rule_tiers else list(tiers.values())
        if allowed:
            longest = max(allowed, key=lambda tier: tier.max_duration_seconds)
            if seconds > longest.max_duration_seconds:
                self._add(
                    key,
                    f"{format_duration(seconds)} is above the longest max_duration of the tiers this rule "
                    f"allows ({format_duration(longest.max_duration_seconds)}, tier {_quote(longest.name)}), "
                    "so it would never refuse a lease; it must be greater than 0 s and at most that",
                )
                return None
        return seconds


def _key_path(parent: str, key: str) -> str:
    part = key if _BARE_KEY.fullmatch(key) else _quote(key)
    return f"{parent}.{part}" if parent else part


def _quote(text: str) -> str:
    """Quote text for a message, escaping control and non-ASCII characters and shortening it."""
    if len(text) > _MAX_QUOTED_LENGTH:
        return json.dumps(text[:_MAX_QUOTED_LENGTH]) + "..."
    return json.dumps(text)


def _is_limit(value: object, *, integer: bool) -> bool:
    """Return whether a value is a usable limit: 0 or more, within TOML's integer range."""
    types_allowed = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, types_allowed):
        return False
    return 0 <= value <= _MAX_TOML_INTEGER


def _describe_number(value: int | float) -> str:
    # str() of an integer beyond sys.get_int_max_str_digits() raises ValueError.
    if isinstance(value, int) and abs(value) >= 10**30:
        return "(an integer of more than 30 digits)"
    return str(value)


def _describe(value: object) -> str:
    """Name a TOML value's type and show the value, for "expected ..., got ..." messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {_describe_number(value)}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    return f"{type(value).__name__} {value}"
