"""One JSON object per log line, for both programs' ``log_format = "json"``.

A formatter only (it turns a record into text; the programs own their
handlers): ``time`` (RFC 3339 UTC with ``Z``, as every time on the wire),
``level``, ``logger``, ``message`` and, when the record carries one,
``exception``. Filters run before formatting, so a redacting filter on the
handler or logger (the server's ``RedactSecrets``) cleans what lands here.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from msp_protocol.encoding import format_time


class JsonLineFormatter(logging.Formatter):
    """A log record as one line of JSON (newlines inside values escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": format_time(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)
