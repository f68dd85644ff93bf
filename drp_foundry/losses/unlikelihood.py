"""Token-level unlikelihood (Welleck et al. 2019, "Neural Text Generation with Unlikelihood
Training"; ours, not in the DRPruning paper): a loss term against repetition loops.

At each predicted position t (the logits at t predict token t + 1), the negative candidates are
the distinct tokens of the context x_0..x_t other than the target x_{t+1}; the term is

    UL = mean over predicted positions of  - sum over candidates c of  log(1 - p_t(c))

so probability put on tokens already seen (and not due next) is pushed down: the pull of
greedy decoding toward copying its own recent output. Added to the LM loss with a weight
(``drp_unlikelihood``'s ``alpha``).

Sequence-level unlikelihood (same paper, section 5.2) works on the model's own output: a prefix
of a training sequence is continued greedily, and every continuation token that is part of an
n-gram already seen earlier in the continuation gets ``-log(1 - p(token))`` at the position that
produced it. It targets exactly the loops that greedy decoding falls into, which the token-level
term only reaches through the training text. ``repeated_ngram_mask`` marks the tokens,
``sequence_unlikelihood`` is the term; ``drp_sequence_unlikelihood`` generates and adds it.

Pure torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

import torch

__all__ = ['token_unlikelihood', 'repeated_ngram_mask', 'sequence_unlikelihood']

IGNORE_INDEX = -100


def token_unlikelihood(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                       ignore_index: int = IGNORE_INDEX, min_gap: float = 1e-5) -> torch.Tensor:
    """The token-level unlikelihood term of a causal LM batch (float32 scalar).

    ``logits``: ``(batch, seq, vocab)``; ``input_ids``: ``(batch, seq)``; ``labels`` as given to
    the HF model (unshifted; default: ``input_ids``): positions whose next label is
    ``ignore_index`` are left out, as is the last position. ``min_gap`` bounds ``1 - p`` from
    below so that a candidate at probability 1 gives a finite loss.
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f'logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree')
    targets = (input_ids if labels is None else labels)[:, 1:]
    context = input_ids[:, :-1]
    steps = context.shape[1]
    scores = logits[:, :-1].float()  # (batch, steps, vocab): position t predicts t + 1
    # p_t(x_j) for every earlier-or-current context token j, (batch, t, j), without a second (batch, steps,
    # vocab) tensor of probabilities: the gathered logits minus the log-normaliser
    candidate_probs = (scores.gather(-1, context.unsqueeze(1).expand(-1, steps, -1))
                       - scores.logsumexp(dim=-1, keepdim=True)).exp()
    same = context.unsqueeze(2) == context.unsqueeze(1)  # (batch, j, k): x_j == x_k
    earlier = torch.ones(steps, steps, dtype=torch.bool, device=context.device).tril(diagonal=-1)
    first_occurrence = ~(same & earlier).any(dim=-1)  # (batch, j): each distinct token counted once
    causal = torch.ones(steps, steps, dtype=torch.bool, device=context.device).tril()  # (t, j): j <= t
    negative = causal & first_occurrence.unsqueeze(1) & (context.unsqueeze(1) != targets.unsqueeze(2))
    penalty = -torch.log((1.0 - candidate_probs).clamp_min(min_gap)) * negative
    predicted = targets != ignore_index
    per_position = penalty.sum(dim=-1)
    return (per_position * predicted).sum() / predicted.sum().clamp_min(1)


def repeated_ngram_mask(token_ids: torch.Tensor, ngram: int = 3, start: int = 0) -> torch.Tensor:
    """``(batch, seq)`` bool: tokens at ``start`` or later inside an ``ngram``-gram that occurred
    before (starting at an earlier position, also at ``start`` or later) in the same row.

    A run of one token longer than ``ngram`` is a repeated n-gram too (``a a a a`` with n = 3: the
    second window repeats the first), so runs are covered. The default n = 3 matches the repetition
    screen (``eval/repetition.py``); Welleck et al. used n = 4 on 100-token continuations.
    """
    if ngram < 1:
        raise ValueError(f'ngram must be >= 1, got {ngram}')
    mask = torch.zeros(token_ids.shape, dtype=torch.bool)
    for row_index, row in enumerate(token_ids.tolist()):
        seen: set[tuple[int, ...]] = set()
        for first in range(start, len(row) - ngram + 1):
            gram = tuple(row[first:first + ngram])
            if gram in seen:
                mask[row_index, first:first + ngram] = True
            seen.add(gram)
    return mask.to(token_ids.device)


def sequence_unlikelihood(logits: torch.Tensor, token_ids: torch.Tensor, start: int, ngram: int = 3,
                          min_gap: float = 1e-5) -> torch.Tensor:
    """The sequence-level unlikelihood term of prefix + continuation rows (float32 scalar).

    ``token_ids``: ``(batch, seq)``, the continuation from position ``start`` on (``start >= 1``);
    ``logits``: the model's ``(batch, seq, vocab)`` on ``token_ids``. The sum over continuation
    tokens inside a repeated n-gram of ``-log(1 - p(token | earlier tokens))``, divided by the
    number of continuation tokens (0 when nothing repeats).
    """
    if logits.shape[:2] != token_ids.shape:
        raise ValueError(f'logits {tuple(logits.shape)} and token_ids {tuple(token_ids.shape)} disagree')
    if not 1 <= start < token_ids.shape[1]:
        raise ValueError(f'start must be in [1, {token_ids.shape[1] - 1}], got {start}')
    negative = repeated_ngram_mask(token_ids, ngram, start)[:, 1:]  # aligned with the predicting position
    scores = logits[:, :-1].float()
    token_probs = (scores.gather(-1, token_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                   - scores.logsumexp(dim=-1)).exp()
    penalty = -torch.log((1.0 - token_probs).clamp_min(min_gap)) * negative
    return penalty.sum() / (token_ids.shape[0] * (token_ids.shape[1] - start))
