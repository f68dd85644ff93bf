"""Token rows of a data_prep root, read directly from its MDS folders (one-shot calibration, the loop-rate
prefixes): no streaming dataset, no mixture, the first rows of each domain in order."""

from __future__ import annotations

from pathlib import Path

import torch


def mds_token_rows(root: Path, split: str, seq_len: int, limit: int = 4096) -> dict[str, list[torch.Tensor]]:
    """``{domain: [token row, ...]}`` from ``ROOT/<domain>/<split>/`` MDS folders: at most ``limit`` rows per
    domain, each cut to ``seq_len`` tokens."""
    from streaming import LocalDataset

    out = {}
    for folder in sorted(path for path in root.iterdir() if (path / split / 'index.json').is_file()):
        dataset = LocalDataset(str(folder), split=split)
        rows = []
        for index in range(len(dataset)):
            sample = dataset[index]
            if 'tokens' not in sample:
                raise ValueError(f'{folder / split}: MDS samples have no tokens column ({sorted(sample)}); '
                                 'pass a data_prep output folder')
            rows.append(torch.as_tensor(sample['tokens'][:seq_len].astype('int64')))
            if len(rows) >= limit:
                break
        out[folder.name] = rows
    return out
