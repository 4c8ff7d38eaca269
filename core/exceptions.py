"""The root of every error the hub raises on purpose."""

from __future__ import annotations


class HubError(Exception):
    """Root exception: every package's own errors derive from it, so callers can catch one type."""


class ConfigurationError(HubError):
    """A setting is missing or has a value the hub cannot use."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"setting {setting}: {reason}")
        self.setting = setting
        self.reason = reason
