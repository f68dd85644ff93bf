"""How often does a model's greedy decoding fall into a repetition loop on held-out text?

Three fixed prompts (the demo's samples) say little; this measures the share of held-out prefixes
whose greedy continuation the repetition screen (``eval/repetition.py``) flags. The prefixes are the
first ``prefix_tokens`` tokens of each domain's eval sequences (data_prep's MDS eval split), so the
figure is reproducible and needs no prompt writing. A continuation that ends at the end-of-text token
is screened up to it.

Code domains repeat for real (``#include``, ``using``): compare a model's rate with the source
model's rate on the same prefixes, not with zero.

Pure torch + the screen; the MDS reading is ``data/token_rows.py``. Command:
``python -m drp_foundry.commands.loop_rate MODEL_DIR DATA_ROOT``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drp_foundry.eval.repetition import find_repetition_loop

__all__ = ['LoopRate', 'heldout_prefixes', 'greedy_continuations', 'loop_rate', 'loop_rate_of_directory']


@dataclass
class LoopRate:
    """Per-domain ``(loops, prefixes)`` and the examples of loops found (first tokens of each)."""

    counts: dict[str, tuple[int, int]]
    loops: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        total = sum(n for _, n in self.counts.values())
        return sum(k for k, _ in self.counts.values()) / max(total, 1)

    def summary(self) -> dict:
        return {'overall': self.overall, 'loops': sum(k for k, _ in self.counts.values()),
                'prefixes': sum(n for _, n in self.counts.values()),
                'per_domain': {d: {'loops': k, 'prefixes': n} for d, (k, n) in self.counts.items()}}


def heldout_prefixes(data_root: str | Path, prefix_tokens: int = 16, per_domain: int = 16,
                     split: str = 'eval') -> dict[str, torch.Tensor]:
    """``{domain: (n, prefix_tokens) int64}``: the first tokens of up to ``per_domain`` eval sequences."""
    from drp_foundry.data.token_rows import mds_token_rows

    if prefix_tokens < 1 or per_domain < 1:
        raise ValueError(f'prefix_tokens and per_domain must be >= 1, got {prefix_tokens}, {per_domain}')
    rows = mds_token_rows(Path(data_root), split, prefix_tokens, limit=per_domain)
    out = {}
    for domain, seqs in rows.items():
        kept = [r for r in seqs if r.numel() == prefix_tokens]
        if kept:
            out[domain] = torch.stack(kept)
    if not out:
        raise ValueError(f'{data_root}: no {split} sequence of {prefix_tokens}+ tokens under <domain>/{split}/')
    return out


@torch.no_grad()
def greedy_continuations(model, prefixes: torch.Tensor, new_tokens: int = 24, batch_size: int = 16,
                         eos_token_id: int | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, cut at ``eos_token_id``) of equal-length ``prefixes``.

    ``model`` is any causal LM that maps ``input_ids`` to ``.logits`` and takes ``past_key_values``
    (a HF ``*ForCausalLM``). Written out rather than ``generate`` so a masked training model works too.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = []
    try:
        for start in range(0, prefixes.shape[0], batch_size):
            ids = prefixes[start:start + batch_size].to(device)
            past = None
            step_input = ids
            generated = []
            for _ in range(new_tokens):
                result = model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = result.past_key_values
                step_input = result.logits[:, -1].argmax(dim=-1, keepdim=True)
                generated.append(step_input)
            rows = torch.cat(generated, dim=1).tolist()
            for row in rows:
                if eos_token_id is not None and eos_token_id in row:
                    row = row[:row.index(eos_token_id)]
                out.append(row)
    finally:
        model.train(was_training)
    return out


def loop_rate(model, prefixes: Mapping[str, torch.Tensor], new_tokens: int = 24, batch_size: int = 16,
              eos_token_id: int | None = None) -> LoopRate:
    """Share of prefixes, per domain, whose greedy continuation the repetition screen flags."""
    counts, loops = {}, {}
    for domain, rows in prefixes.items():
        continuations = greedy_continuations(model, rows, new_tokens, batch_size, eos_token_id)
        flagged = [c for c in continuations if find_repetition_loop(c) is not None]
        counts[domain] = (len(flagged), len(continuations))
        loops[domain] = flagged
    return LoopRate(counts, loops)


def loop_rate_of_directory(model_dir: str | Path, prefixes: Mapping[str, torch.Tensor], new_tokens: int = 24):
    """``(LoopRate, tokenizer)`` of a HF model folder (float32, CPU), continuations cut at its end-of-text token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return loop_rate(model, prefixes, new_tokens, eos_token_id=tokenizer.eos_token_id), tokenizer
