"""``--log-format``: twistd's text lines (the default) or one JSON object per line.

A JSON line is twisted.logger's own serialisation of the event (``eventAsJSON``):
every structured field the code logged (``harbor``, ``endpoint``, ``reason``, ...) plus
twisted.logger's ``log_namespace``, ``log_level`` (``{"name": "info", ...}``),
``log_time``, ``log_format``, and ``log_text``, the message with its fields filled in (a
failure's traceback appended; ``log_logger`` is left out).
``twisted.logger.eventsFromJSONLogFile`` reads it back.

twistd chooses its log observer after the daemon's service is made: it takes the
``ILogObserver`` component of its application if one is set (the way a ``.tac`` file
chooses one), so :class:`DaemonService`, the daemon's top service, sets it there when
twistd attaches it.
"""

from __future__ import annotations

import contextlib
import sys
from typing import IO, Any, Final

from twisted.application.service import MultiService
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, eventAsJSON, formatEvent
from twisted.python import logfile
from twisted.python.components import Componentized
from zope.interface import implementer

__all__ = ["LOG_FORMATS", "DaemonService", "JSONLinesObserver", "log_file", "log_format"]

LOG_FORMATS: Final = ("text", "json")


def log_format(text: str) -> str:
    """The ``--log-format`` option's check: ``text`` or ``json``."""
    if text not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {text!r}")
    return text


#: keys left out of a line: the Logger object itself (which JSON cannot carry)
_LEFT_OUT: Final = ("log_logger",)


def _json_line(event: LogEvent) -> str:
    record = {key: value for key, value in event.items() if key not in _LEFT_OUT}
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        with contextlib.suppress(Exception):  # a failure that cannot render: the message
            text = f"{text}\n{failure.getTraceback()}"
    record["log_text"] = text
    return eventAsJSON(record) + "\n"


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON to ``out`` (flushed after each line)."""

    def __init__(self, out: IO[Any]) -> None:
        self.out = out
        self._observer = FileLogObserver(out, _json_line)

    def __call__(self, event: LogEvent) -> None:
        """Write one log event as one JSON line."""
        self._observer(event)


def log_file(twistd_options: Any) -> IO[Any]:
    """Where twistd would write its log for these (twistd's own) options: standard
    output with ``--nodaemon`` and no ``--logfile`` (or ``--logfile -``), else the file
    (``twistd.log`` by default) as a twisted.python.logfile.LogFile, as twistd opens it."""
    name = twistd_options.get("logfile", "") if twistd_options is not None else "-"
    nodaemon = twistd_options.get("nodaemon", True) if twistd_options is not None else True
    if name == "-" or (nodaemon and not name):
        return sys.stdout
    opened: IO[Any] = logfile.LogFile.fromFullPath(  # type: ignore[no-untyped-call]
        name or "twistd.log")
    return opened


class DaemonService(MultiService):
    """A daemon's top service; with ``observer``, twistd logs to it instead of its own
    text observer."""

    def __init__(self, observer: ILogObserver | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        """Install the JSON log observer on twistd's application (when given) before joining it."""
        if self.observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)  # type: ignore[no-untyped-call]
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]
