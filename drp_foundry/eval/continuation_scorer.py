"""Score two-option continuation items: is the right continuation the more likely one?

An item (paper §5.2) is a ``context``, the ``right`` continuation taken from held-out
text, and a plausible ``wrong`` one. A causal LM gets the item right when

    score(right | context) > score(wrong | context).

Length normalisation (our choice, key ``normalization``):

- ``token_mean`` (default): score = (1/|c|) sum_t log p(c_t | context, c_<t), the mean
  log-probability per continuation token, i.e. minus the cross-entropy on the
  continuation. Right and wrong continuations have different lengths; a plain sum adds a
  negative term for every token, so comparing sums largely asks "which is shorter?"
  (worst in the offline build, where the wrong continuation comes from another
  document). The per-token mean compares the model's average surprise instead, the same
  quantity as the per-domain eval loss the data scheduler reads, and all models we
  compare (source, pruned, continued) share one tokenizer, so per-token is a fair unit.
- ``sum``: the total log-likelihood, the paper's literal "higher likelihood" and
  lm-eval's ``acc``. Reported alongside for comparison with the harness.

Tokenisation follows lm-eval's Hugging Face backend exactly (no special tokens; the pair
is encoded jointly and split after the context's tokens; at most ``max_length + 1``
tokens kept from the right), so ``sum`` accuracy here equals lm-eval ``acc`` on the same
items.

Works on any HF causal LM, in-process (a model object) or from a local directory
(:func:`load_causal_lm`); batched; CPU is fine for small models.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from drp_foundry.fileio import read_jsonl

NORMALIZATIONS = ('token_mean', 'sum')
ITEM_KEYS = ('context', 'right', 'wrong', 'domain')


@dataclass(frozen=True)
class ContinuationItem:
    """One benchmark item; ``right``/``wrong`` carry their own leading whitespace."""

    context: str
    right: str
    wrong: str
    domain: str
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass
class ContinuationReport:
    """Per-item log-likelihoods and the accuracies derived from them.

    ``right_sum``/``wrong_sum`` are summed log-probabilities of each continuation;
    ``right_tokens``/``wrong_tokens`` the number of scored tokens.
    """

    domains: list[str]
    right_sum: np.ndarray
    wrong_sum: np.ndarray
    right_tokens: np.ndarray
    wrong_tokens: np.ndarray
    normalization: str = 'token_mean'

    def margins(self, normalization: str | None = None) -> np.ndarray:
        """score(right) - score(wrong) per item; > 0 means the model picked the right one."""
        normalization = _check_normalization(normalization or self.normalization)
        if normalization == 'sum':
            return self.right_sum - self.wrong_sum
        return self.right_sum / self.right_tokens - self.wrong_sum / self.wrong_tokens

    def correct(self, normalization: str | None = None) -> np.ndarray:
        return self.margins(normalization) > 0

    def accuracy(self, normalization: str | None = None) -> float:
        """Accuracy over all items (micro average)."""
        return float(self.correct(normalization).mean()) if self.domains else math.nan

    def per_domain_accuracy(self, normalization: str | None = None) -> dict[str, float]:
        """Accuracy per domain, in order of first appearance."""
        correct = self.correct(normalization)
        domains = np.asarray(self.domains)
        return {d: float(correct[domains == d].mean()) for d in dict.fromkeys(self.domains)}

    def macro_accuracy(self, normalization: str | None = None) -> float:
        """Unweighted mean of the per-domain accuracies."""
        per_domain = self.per_domain_accuracy(normalization)
        return float(np.mean(list(per_domain.values()))) if per_domain else math.nan

    def summary(self) -> dict:
        """A JSON-ready summary: accuracies under both normalisations and item counts."""
        counts = {d: self.domains.count(d) for d in dict.fromkeys(self.domains)}
        return {
            'normalization': self.normalization,
            'accuracy': self.accuracy(),
            'macro_accuracy': self.macro_accuracy(),
            'per_domain': self.per_domain_accuracy(),
            'accuracy_sum': self.accuracy('sum'),
            'per_domain_sum': self.per_domain_accuracy('sum'),
            'items_per_domain': counts,
        }


def _check_normalization(normalization: str) -> str:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f'normalization={normalization!r} is not one of {NORMALIZATIONS}')
    return normalization


def read_items(path: str | Path) -> list[ContinuationItem]:
    """Read items from JSONL; a missing key or empty field is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'continuation items file {path} does not exist; build one with '
                                '`drp-eval build ...`')
    items = []
    for line_number, record in read_jsonl(path):
        missing = [k for k in ITEM_KEYS if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
            raise ValueError(f'{path}:{line_number}: item needs non-empty string fields {list(ITEM_KEYS)}; '
                             f'missing or empty: {missing}')
        items.append(ContinuationItem(record['context'], record['right'], record['wrong'],
                                      record['domain'], record.get('meta') or {}))
    if not items:
        raise ValueError(f'continuation items file {path} holds no items')
    return items


def write_items(items: Iterable[ContinuationItem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        for item in items:
            f.write(item.to_json() + '\n')
    return path


def load_causal_lm(model_dir: str | Path, device: str | torch.device = 'cpu', torch_dtype: torch.dtype | None = None):
    """Load ``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local HF directory (no hub)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / 'config.json').is_file():
        raise FileNotFoundError(f'{model_dir} is not a Hugging Face model directory (no config.json); pass the '
                                'folder written by `drp-export` or `save_pretrained`')
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, torch_dtype=torch_dtype)
    return model.to(device).eval(), tokenizer


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-eval's HF backend splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    if not context_ids:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    return context_ids, whole[len(context_ids):]


def _model_max_length(model) -> int:
    config = getattr(model, 'config', None)
    for key in ('max_position_embeddings', 'n_positions', 'max_seq_len'):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@torch.no_grad()
def continuation_log_likelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                                 max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed log p(continuation | context) and scored-token count for each (context, continuation).

    Sequences longer than ``max_length + 1`` tokens lose tokens from the left (context first).
    The model runs in eval mode on its own device; its previous mode is restored.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    max_length = max_length or _model_max_length(model)
    device = next(model.parameters()).device
    encoded = []
    for context, continuation in pairs:
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not continuation_ids:
            raise ValueError(f'continuation {continuation!r} encodes to no tokens after context {context[-60:]!r}')
        tokens = (context_ids + continuation_ids)[-(max_length + 1):]
        encoded.append((tokens[:-1], tokens[1:], min(len(continuation_ids), len(tokens) - 1)))

    sums = np.zeros(len(encoded), dtype=np.float64)
    counts = np.zeros(len(encoded), dtype=np.int64)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # similar lengths batch together
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(encoded[i][0]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                inputs = encoded[i][0]
                input_ids[row, :len(inputs)] = torch.tensor(inputs)
                attention_mask[row, :len(inputs)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            for row, i in enumerate(batch):
                inputs, targets, n_scored = encoded[i]
                end = len(inputs)
                log_probs = torch.log_softmax(logits[row, end - n_scored:end].float(), dim=-1)
                target_ids = torch.tensor(targets[end - n_scored:end], device=log_probs.device)
                sums[i] = log_probs.gather(-1, target_ids[:, None]).sum().item()
                counts[i] = n_scored
    finally:
        model.train(was_training)
    return sums, counts


def score_items(model, tokenizer, items: Sequence[ContinuationItem], batch_size: int = 16,
                normalization: str = 'token_mean', max_length: int | None = None) -> ContinuationReport:
    """Score every item with ``model``; the report gives per-domain and overall accuracy."""
    _check_normalization(normalization)
    pairs = [(item.context, item.right) for item in items] + [(item.context, item.wrong) for item in items]
    sums, counts = continuation_log_likelihoods(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length)
    n = len(items)
    return ContinuationReport(domains=[item.domain for item in items], right_sum=sums[:n], wrong_sum=sums[n:],
                              right_tokens=counts[:n], wrong_tokens=counts[n:], normalization=normalization)
