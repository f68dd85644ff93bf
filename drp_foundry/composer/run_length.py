"""The run's length in batches, read from Composer's ``State.max_duration``: the unit our schedules count in."""

from __future__ import annotations

from composer.core import State, TimeUnit


def max_duration_in_batches(state: State, needed_by: str, alternative: str = '') -> int:
    """``max_duration`` in batches (epochs are converted when the dataloader has a length).

    ``needed_by`` names the component in the message (``drp_lagrangian``); ``alternative`` is
    appended to the fix (``or set drp_lagrangian.warmup_steps``). Raises ``ValueError`` when the
    run has no ``max_duration`` or one that cannot be counted in batches (tokens, samples, an
    epoch of an endless stream).
    """
    max_duration = state.max_duration
    if max_duration is None:
        raise ValueError(f'{needed_by} needs `max_duration` (in batches, e.g. 3200ba){alternative}')
    if max_duration.unit == TimeUnit.BATCH:
        return int(max_duration.value)
    if max_duration.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
        return int(max_duration.value) * int(state.dataloader_len)
    raise ValueError(f'{needed_by} counts in batches and cannot turn max_duration={max_duration} into batches; set '
                     f'`max_duration` in batches (e.g. 3200ba){alternative}')
