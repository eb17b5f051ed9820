"""
Structured logging: one event type per thing that happens, as JSON lines.

Events are emitted with ``twisted.logger``; each carries ``event_type`` (e.g.
``pyflock:control:dataset-created``) and the ids it concerns, so tests and operators can
select them without parsing prose.
"""

from __future__ import annotations

import json
import sys
from typing import IO

from twisted.logger import (
    FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate, Logger,
    PredicateResult, formatEvent, globalLogBeginner,
)
from zope.interface import implementer


def log_event(logger: Logger, event_type: str, level: LogLevel = LogLevel.info,
              **fields) -> None:
    """Emit one structured event of ``event_type`` carrying ``fields``."""
    logger.emit(level, event_type + " {event_fields}", event_type=event_type,
                event_fields=" ".join(f"{k}={v}" for k, v in fields.items()), **fields)


def events_of(events: list, event_type: str) -> list:
    """The captured events of one type (for tests using ``Logger`` capture helpers)."""
    return [e for e in events if e.get("event_type") == event_type]


def event_as_json(event: dict) -> str:
    """One log event as a compact JSON line: time, level, type, message, its fields."""
    record = {
        "time": round(event.get("log_time", 0.0), 6),
        "level": event["log_level"].name if "log_level" in event else "info",
        "event_type": event.get("event_type", "log"),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in ("event_type", "event_fields", "message",
                                             "format", "isError", "system", "time"):
            continue
        if value is None or isinstance(value, (str, int, float, bool)):
            record[key] = value
    if "event_type" not in event:
        record["message"] = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event to a text stream as one JSON line (``event_as_json``)."""

    def __init__(self, stream: IO[str]):
        self._stream = stream

    def __call__(self, event: dict) -> None:
        self._stream.write(event_as_json(event) + "\n")
        self._stream.flush()


def _drop_factory_chatter(event: dict) -> PredicateResult:
    """Twisted's "Starting/Stopping factory" lines say nothing an operator can use."""
    text = event.get("log_text") or event.get("log_format") or ""
    # ThrottlingFactory says this of every connection refused at the cap (pyflock logs one
    # pyflock:tls:connections-full event instead).
    if isinstance(text, str) and text.startswith(("Starting factory", "Stopping factory",
                                                  "Max connection count reached")):
        return PredicateResult.no
    return PredicateResult.maybe


def start_json_logging(stream: IO[str] = sys.stdout,
                       level: LogLevel = LogLevel.info) -> ILogObserver:
    """Send every log event to ``stream`` as one JSON object per line."""
    observer = FilteringLogObserver(JSONLinesObserver(stream),
                                    [LogLevelFilterPredicate(defaultLogLevel=level),
                                     _drop_factory_chatter])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return observer

