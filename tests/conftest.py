import asyncio
import logging
from collections.abc import Callable, Iterator

import pytest

SLOW_CALLBACK = 0.25
"""Seconds a single callback may hold the event loop before the test fails."""


def _debug_loop() -> asyncio.AbstractEventLoop:
    # Debug mode reports every callback that holds the loop longer than slow_callback_duration.
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK
    return loop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"debug": _debug_loop}


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing") and " took " in message:
            self.seen.append(message)


@pytest.fixture(autouse=True)
def loop_is_never_blocked() -> Iterator[None]:
    """Fail any test during which one callback held the event loop for over SLOW_CALLBACK seconds."""
    handler = _SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.seen, f"the event loop was blocked: {handler.seen}"
