"""Token-level unlikelihood (Welleck et al. 2019, "Neural Text Generation with Unlikelihood
Training"; ours, not in the DRPruning paper): a loss term against repetition loops.

At each predicted position t (the logits at t predict token t + 1), the negative candidates are
the distinct tokens of the context x_0..x_t other than the target x_{t+1}; the term is

    UL = mean over predicted positions of  - sum over candidates c of  log(1 - p_t(c))

so probability put on tokens already seen (and not due next) is pushed down: the pull of
greedy decoding toward copying its own recent output. Added to the LM loss with a weight
(``drp_unlikelihood``'s ``alpha``).

Pure torch: no Composer or LLM-Foundry import.
"""

from __future__ import annotations

import torch

__all__ = ['token_unlikelihood']

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
