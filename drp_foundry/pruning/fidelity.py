"""Whether the exported model is the trained one (ours, issue 26): the figures export and the end of pruning report.

Export keeps exactly the target counts (``deterministic('target')``) whatever the masks learned.
When the learned masks were not on target, or were still noisy, export cuts a model other than
the one the run trained. ``mask_fidelity`` says by how much:

- ``expected_num_parameters`` vs ``target_num_parameters``: the size the run trained at (under
  the keep probabilities P(z != 0)) against the size export cuts; ``relative_size_gap`` is their
  difference over the target;
- ``kept_rows``: for the per-layer masks (head, intermediate), the expected kept count of every
  layer that export keeps, against the target count; ``worst_row_gap`` is the largest
  ``|expected - target|`` over those layers (entries), and over the layer and hidden masks;
- ``undecided_share``: the share of mask entries whose training-time gate disagrees with its
  exported value more than ``DECIDED_TOLERANCE`` (5%) of the time: ``P(z != 1)`` for an entry
  export keeps, ``P(z != 0)`` for one it prunes, at the module's temperature. At the log-alpha
  clamps and the paper's temperature 2/3 these are 0.047 and 0.047 (decided, just); an entry
  anywhere between is undecided;
- the eval loss of the masked model as trained (``masked_loss``: training-mode masks, a mean
  over a few noise draws, or the hardened masks) against the exported model (``exported_loss``),
  where eval batches are at hand.

``FidelityReport.warnings`` lists what is past its tolerance (``TOLERANCES``): a relative size
gap above 2%, a row more than half an entry off its target, an undecided share above 10%, an
exported loss more than 0.05 nats above the masked one.

Pure torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import torch

from drp_foundry.pruning import hard_concrete

__all__ = ['DECIDED_TOLERANCE', 'TOLERANCES', 'FidelityReport', 'disagreement', 'undecided_shares', 'undecided_share',
           'mask_fidelity', 'mean_lm_loss', 'masked_lm_loss']

DECIDED_TOLERANCE = 0.05
TOLERANCES = {'relative_size_gap': 0.02, 'worst_row_gap': 0.5, 'undecided_share': 0.10, 'loss_gap': 0.05}


def disagreement(log_alpha: torch.Tensor, kept: torch.Tensor, temperature: float = hard_concrete.TEMPERATURE
                 ) -> torch.Tensor:
    """Per entry, the probability that a training sample's gate differs from the exported value:
    ``P(z != 1)`` where ``kept``, ``P(z != 0)`` elsewhere."""
    log_alpha = log_alpha.detach().float().clamp(hard_concrete.LOG_ALPHA_MIN, hard_concrete.LOG_ALPHA_MAX)
    return torch.where(kept, 1.0 - hard_concrete.prob_one(log_alpha, temperature),
                       hard_concrete.prob_nonzero(log_alpha, temperature))


def undecided_shares(log_alphas: Mapping[str, torch.Tensor], keep: Mapping[str, Any],
                     temperature: float = hard_concrete.TEMPERATURE, tolerance: float = DECIDED_TOLERANCE
                     ) -> dict[str, float]:
    """Share of undecided entries per mask and over all of them (``'total'``); ``keep`` as ``keep_top_k``."""
    shares, undecided, entries = {}, 0, 0
    for key, log_alpha in log_alphas.items():
        kept = hard_concrete.keep_top_k(log_alpha.detach().float(), keep[key])
        count = int((disagreement(log_alpha, kept, temperature) > tolerance).sum())
        shares[key] = count / log_alpha.numel()
        undecided, entries = undecided + count, entries + log_alpha.numel()
    shares['total'] = undecided / max(entries, 1)
    return shares


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def undecided_share(mask_module, tolerance: float = DECIDED_TOLERANCE) -> dict[str, float]:
    """``undecided_shares`` of an ``L0MaskModule`` at its temperature and target counts (an FSDP2-sharded
    module is gathered: every rank must call it)."""
    log_alphas = {key: _full(mask_module.log_alpha(key)) for key in mask_module.granularities}
    return undecided_shares(log_alphas, mask_module.keep_counts('target'), mask_module.temperature, tolerance)


@dataclasses.dataclass
class FidelityReport:
    """The figures of the module doc (plain values, for JSON and the model card)."""

    expected_num_parameters: float
    target_num_parameters: int
    relative_size_gap: float
    temperature: float
    hardened: bool
    kept_layers: list[int]
    kept_rows: dict[str, dict[str, Any]]
    worst_row_gap: float
    undecided_share: dict[str, float]
    masked_loss: float | None = None
    exported_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def warnings(self, tolerances: Mapping[str, float] = TOLERANCES) -> list[str]:
        """One sentence per figure past its tolerance (empty: the exported model is the trained one)."""
        out = []
        if abs(self.relative_size_gap) > tolerances['relative_size_gap']:
            out.append(f'the masks expect {self.expected_num_parameters:,.0f} parameters but export cuts '
                       f'{self.target_num_parameters:,} ({self.relative_size_gap:+.1%})')
        if self.worst_row_gap > tolerances['worst_row_gap']:
            worst = ', '.join(f'{key} {row["expected"]}' for key, row in self.kept_rows.items())
            out.append(f'mask rows are up to {self.worst_row_gap:.2f} entries off their target (expected kept '
                       f'counts of the kept layers: {worst}; targets '
                       f'{ {key: row["target"] for key, row in self.kept_rows.items()} })')
        if self.undecided_share['total'] > tolerances['undecided_share']:
            out.append(f'{self.undecided_share["total"]:.1%} of the mask entries are undecided (their training '
                       f'gate disagrees with the exported value more than {DECIDED_TOLERANCE:.0%} of the time)')
        if self.masked_loss is not None and self.exported_loss is not None and \
                self.exported_loss - self.masked_loss > tolerances['loss_gap']:
            out.append(f'the exported model\'s eval loss {self.exported_loss:.3f} is above the masked model\'s '
                       f'{self.masked_loss:.3f} (as trained)')
        return out

    def summary(self) -> str:
        return (f'expected {self.expected_num_parameters:,.0f} vs target {self.target_num_parameters:,} parameters '
                f'({self.relative_size_gap:+.2%}); worst row {self.worst_row_gap:.2f} entries off; undecided '
                f'{self.undecided_share["total"]:.1%}' + ('' if self.masked_loss is None else
                f'; eval loss masked {self.masked_loss:.4f}, exported {self.exported_loss:.4f}'))


def mask_fidelity(mask_module, masked_loss: float | None = None, exported_loss: float | None = None
                  ) -> FidelityReport:
    """The ``FidelityReport`` of an ``L0MaskModule`` (plain or FSDP2-sharded: then every rank must call it)."""
    from drp_foundry.pruning.expected_size import expected_fractions, expected_num_parameters

    with torch.no_grad():
        log_alphas = {key: _full(mask_module.log_alpha(key)).detach().float() for key in mask_module.granularities}
        probs = {key: hard_concrete.prob_nonzero(value.clamp(hard_concrete.LOG_ALPHA_MIN, hard_concrete.LOG_ALPHA_MAX),
                                                 mask_module.temperature) for key, value in log_alphas.items()}
        expected = float(expected_num_parameters(mask_module.source, probs))
        fractions = expected_fractions(mask_module.source, probs)
    target_parameters = mask_module.target_num_parameters()
    counts = mask_module.keep_counts('target')
    if 'layer' in log_alphas:
        kept_layers = torch.nonzero(hard_concrete.keep_top_k(log_alphas['layer'], counts['layer'])).flatten().tolist()
    else:
        kept_layers = list(range(mask_module.source.num_layers))
    rows, worst = {}, 0.0
    for key, value in log_alphas.items():
        length = value.shape[-1]
        if value.dim() == 2:
            target = int(counts[key][0])
            expected_rows = [round(float(fractions[key][layer]) * length, 3) for layer in kept_layers]
        else:
            target = int(counts[key])
            expected_rows = [round(float(fractions[key]) * length, 3)]
        rows[key] = {'target': target, 'expected': expected_rows}
        worst = max([worst] + [abs(count - target) for count in expected_rows])
    return FidelityReport(
        expected_num_parameters=expected, target_num_parameters=int(target_parameters),
        relative_size_gap=(expected - target_parameters) / target_parameters,
        temperature=float(mask_module.temperature), hardened=bool(mask_module.hardened), kept_layers=kept_layers,
        kept_rows=rows, worst_row_gap=round(worst, 3),
        undecided_share=undecided_shares(log_alphas, counts, mask_module.temperature),
        masked_loss=masked_loss, exported_loss=exported_loss)


def mean_lm_loss(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token loss of a HF causal LM on ``batches`` (``input_ids``, optional
    ``attention_mask``), without gradients, in the model's current mode."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            input_ids = batch['input_ids']
            attention_mask = batch.get('attention_mask')
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
            labels = input_ids[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       labels.reshape(-1), reduction='none')
            weight = torch.ones_like(losses) if attention_mask is None else attention_mask[:, 1:].reshape(-1).float()
            total += float((losses * weight).sum())
            tokens += int(weight.sum())
    if tokens == 0:
        raise ValueError('no eval tokens: the eval batches are empty')
    return total / tokens


def masked_lm_loss(hf_model: torch.nn.Module, batches: list[Mapping[str, torch.Tensor]], draws: int = 4) -> float:
    """The loss of a model carrying L0 masks as it was trained: training-mode masks (a fresh sample per
    forward, or the deterministic target masks once hardened), the mean over ``draws`` passes."""
    from drp_foundry.pruning.hf_injection import get_mask_module

    masks = get_mask_module(hf_model)
    was_training = hf_model.training
    hf_model.train()
    try:
        passes = 1 if masks is None or masks.hardened else draws
        return sum(mean_lm_loss(hf_model, batches) for _ in range(passes)) / passes
    finally:
        hf_model.train(was_training)
