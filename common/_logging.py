"""
Structured logging: one event type per thing that happens, as JSON lines.

Events are emitted with ``twisted.logger``; each carries ``event_type`` (e.g.
``pyflock:control:dataset-created``) and the ids it concerns, so tests and operators can
select them without parsing prose.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import (
    FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate, Logger,
    globalLogBeginner, jsonFileLogObserver,
)


def log_event(logger: Logger, event_type: str, level: LogLevel = LogLevel.info,
              **fields) -> None:
    """Emit one structured event of ``event_type`` carrying ``fields``."""
    logger.emit(level, event_type + " {event_fields}", event_type=event_type,
                event_fields=" ".join(f"{k}={v}" for k, v in fields.items()), **fields)


def events_of(events: list, event_type: str) -> list:
    """The captured events of one type (for tests using ``Logger`` capture helpers)."""
    return [e for e in events if e.get("event_type") == event_type]


def start_json_logging(stream: IO[str] = sys.stdout,
                       level: LogLevel = LogLevel.info) -> ILogObserver:
    """Send every log event to ``stream`` as one JSON object per line."""
    observer = FilteringLogObserver(
        jsonFileLogObserver(stream, recordSeparator=""),
        [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return observer

