"""The pre-flight's error and the reading of durations, shared by its check modules (no import circle).

``config_checks``, ``preflight_checks`` and ``resume_checks`` raise ``ConfigError``; each message
names the key and the fix.
"""

from __future__ import annotations

from typing import Any

__all__ = ['ConfigError', 'batches_of']


class ConfigError(ValueError):
    """A configuration mistake found before training; the message names the key and the fix."""


def batches_of(value: Any, key: str) -> tuple[int | None, str | None]:
    """(batches, unit) of a Composer time value (int = batches); unit None when unparsable."""
    if value is None:
        return None, None
    if isinstance(value, int):
        return value, 'ba'
    from composer.core import Time, TimeUnit

    try:
        time = Time.from_timestring(str(value))
    except (ValueError, TypeError):
        raise ConfigError(f'{key}: {value!r} is not a duration; write e.g. 3200ba or 1000000tok') from None
    return (int(time.value), 'ba') if time.unit == TimeUnit.BATCH else (None, time.unit.value)
