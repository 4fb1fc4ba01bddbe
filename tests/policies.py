"""Policies shared by the test suites."""

TEST_POLICY = """
version = 1
default_tier = "standard"
admins = ["ops"]

[limits]
# Unlimited: tests that exercise the limits bring their own policy.
max_live_leases_per_principal = 0
grants_per_second_per_principal = 0

[tiers.standard]
idle_timeout = "5m"
max_duration = "1h"

[tiers.short]
idle_timeout = "1s"
max_duration = "4s"

[tiers.brief]
idle_timeout = "1s"
max_duration = "2s"

[[methods]]
pattern = "/test.Guarded/*"
max_session_age = "2s"

[[methods]]
pattern = "/test.Guarded/ShortOnly"
tiers = ["short"]
"""

ONE_TIER_POLICY = """
version = 1
default_tier = "standard"

[tiers.standard]
idle_timeout = "10s"
max_duration = "100s"
"""
"""One tier with a 10 s idle timeout and a 100 s max duration, for tests that restart or watch one authority."""
