"""Custom tensor ops that no library provides in an exportable form."""

from edgeopt.ops.selective_scan import selective_scan

__all__ = ["selective_scan"]
