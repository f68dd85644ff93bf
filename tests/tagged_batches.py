"""Reading a multi-domain dataset whose samples are tagged: every token of a sample is its tag.

Shared by the local and the remote dataset tests.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader


def read_tagged_batches(dataset, num_batches, num_workers=0, changes=None, context=None, settle_s=0.0,
                        first_batch=0, persistent_workers=None):
    """Consume batches; ``changes[c] = q`` calls set_proportions(q, at_batch=c) once global batch c is next.

    ``first_batch``: the global batch this loader starts at (a resumed run), like Composer's timestamp.
    ``settle_s``: wait before a change so workers fill every prefetch slot first (the worst case).

    Returns (domain_idx, sample tag) per batch, as an int array (num_batches, B, 2).
    """
    changes = changes or {}
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    loader = DataLoader(dataset, batch_size=dataset.device_batch_size, num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None, persistent_workers=persistent_workers,
                        multiprocessing_context=context if num_workers else None)
    out = []
    iterator = iter(loader)
    for c in range(first_batch, first_batch + num_batches):
        if c in changes:
            if settle_s:
                time.sleep(settle_s)
            dataset.set_proportions(changes[c], at_batch=c)
        batch = next(iterator)
        tags = batch['input_ids'][:, 0]
        assert torch.all(batch['input_ids'] == tags[:, None])
        out.append(torch.stack([batch['domain_idx'], tags], dim=1).numpy())
    del iterator
    return np.stack(out)
