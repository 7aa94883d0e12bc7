"""Log output for people (text) and for log pipelines (JSON, one object per line).

A log pipeline (Loki, Elasticsearch, Cloud Logging) parses each line once; a traceback spread over
lines, or fields inside a sentence, cannot be searched. The JSON form keeps the sentence as
`message` and adds, where a log call gives them (`extra=`), the fields operators filter on:
the Envoy's `node`, its node `group`, the xDS `type` and `version`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("node", "group", "type", "version", "object", "file")
"""Attributes a log call may pass with `extra=`; the JSON form carries each one it finds."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update({name: str(getattr(record, name)) for name in FIELDS if getattr(record, name, None) is not None})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", form: str = "text") -> None:
    """Log to stderr at `level` (DEBUG, INFO, WARNING, ERROR), as text or as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])  # a no-op where logging is set up already (pytest)
