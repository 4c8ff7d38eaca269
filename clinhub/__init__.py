"""Command line, settings and local service management for the regional clinical event hub."""

__version__ = "0.1.0"
