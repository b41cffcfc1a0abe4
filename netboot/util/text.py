"""Text for people: durations short enough for a table cell."""

from __future__ import annotations


def human_duration(seconds: float) -> str:
    """3725 -> '1h 2m': short enough for a table cell."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"
