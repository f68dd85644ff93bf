"""Warnings that the pinned stack raises on every run of ours and that we know to be harmless: filtered by
message, nothing broader, each with the reason.

The warnings our own configs caused are fixed where they arose instead (the eval-only Trainer gets an
optimizer; loaders pin memory only with an accelerator; no ``use_auth_token`` in our recipes).
"""

from __future__ import annotations

import warnings

HARMLESS = (
    # LLM-Foundry 0.22's hf_causal_lm passes use_auth_token=False to every from_pretrained call, and
    # transformers 4.51 warns about the argument whatever its value; no token is ever used (nothing is
    # downloaded), and a config cannot turn the argument off.
    (FutureWarning, r'The `use_auth_token` argument is deprecated'),
)


def filter_harmless_warnings() -> None:
    for category, message in HARMLESS:
        warnings.filterwarnings('ignore', message=message, category=category)
