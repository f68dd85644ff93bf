"""data_prep's progress bar: a tqdm bar that shows on a terminal and stays silent in logs and tests."""

from __future__ import annotations


def progress_bar(total: float | None = None, desc: str = '', unit: str = 'it', disable: bool | None = None, **kwargs):
    """A tqdm bar on stderr; ``disable=None`` shows it only on a terminal (logs and tests stay clean)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=disable, dynamic_ncols=True,
                leave=False, **kwargs)
