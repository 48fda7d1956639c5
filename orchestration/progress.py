"""The CLI's progress logger: one line per finished step, in whichever process runs the step."""

import logging
import sys
import time
from typing import Any

import dagster as dg


class _ProgressHandler(logging.Handler):
    """Prints one line per finished step, so a person sees the graph advance."""

    def __init__(self, stream: Any) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream
        self.started: dict[str, float] = {}

    def _line(self, text: str) -> None:
        # One write per line: step processes running side by side share the terminal.
        self.stream.write(text + "\n")
        self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "dagster_event", None)
        if event is None:
            # The assets' own progress and decisions (context.log.info and above).
            if record.levelno >= logging.INFO:
                meta = getattr(record, "dagster_meta", None) or {}
                message = meta.get("orig_message") or record.getMessage()
                self._line(f"      {message}")
            return
        step = event.step_key or ""
        kind = event.event_type_value
        if kind == "STEP_START":
            self.started[step] = time.perf_counter()
            self._line(f"  ... {step}")
        elif kind == "STEP_SUCCESS":
            took = time.perf_counter() - self.started.get(step, time.perf_counter())
            self._line(f"  ok  {step} ({took:.1f}s)")
        elif kind == "STEP_FAILURE":
            self._line(f"  FAILED {step}")


@dg.logger(description="One line per step for the CLI.")
def progress_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.getLogger("recsys.progress")
    logger.handlers = [_ProgressHandler(sys.stderr)]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger
