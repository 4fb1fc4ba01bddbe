"""Policies shared by the test suites."""

TEST_POLICY = """
version = 1
default_tier = "standard"
admins = ["ops"]

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
