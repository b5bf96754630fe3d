"""edgetune's own warnings, delivered to whoever runs it: ``on_event`` for the API, ``warning: ...`` on the CLI.

Modules deep in the train wing warn through ``logging`` (a LoRA target the model lacks, a skipped checkpoint, rows
dropped from the data). ``forward_warnings`` hands those records to the caller's ``on_event`` while a run lasts,
instead of threading a callback through every function. A forwarded record is marked (``FORWARDED``), so a
logging handler that would show it a second time (the CLI's) can skip it.
"""

import contextlib
import logging
from collections.abc import Callable, Iterator

PREFIX = "warning: "
FORWARDED = "edgetune_forwarded"


class _Forward(logging.Handler):
    def __init__(self, notify: Callable[[str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.notify = notify

    def emit(self, record: logging.LogRecord) -> None:
        setattr(record, FORWARDED, True)
        self.notify(PREFIX + record.getMessage())


@contextlib.contextmanager
def forward_warnings(notify: Callable[[str], None] | None) -> Iterator[None]:
    """Within the block, warnings of edgetune's loggers also go to ``notify``, with ``warning: `` in front."""
    if notify is None:
        yield
        return
    package_logger, handler = logging.getLogger("edgetune"), _Forward(notify)
    package_logger.addHandler(handler)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
