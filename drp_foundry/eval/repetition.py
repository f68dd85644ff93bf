"""Is a generated continuation a repetition loop? A pure check on token ids, used by the demo's sample.

A continuation counts as a loop when one token runs ``run`` times in a row (``\\n\\n\\n\\n``,
``1111``), when one ``ngram``-gram of tokens occurs ``repeats`` times or more (``, and the
city, and the city, and the city``), or when a span of ``long_ngram`` tokens or more occurs
twice without overlap (a sentence said again: ``is a great example of the world. The history of
the city is a great example of the world``). The defaults flag the loops the demo's small models
fall into within 24 tokens and pass the source model's continuations; they are a screen, not a
measure of fluency.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RepetitionLoop:
    """The repeated span (token ids) and how many times it occurs."""

    tokens: tuple[int, ...]
    count: int
    kind: str  # 'run' (one token in a row), 'ngram' (an n-gram anywhere), 'span' (a long span twice)


def find_repetition_loop(token_ids: Sequence[int], ngram: int = 3, repeats: int = 3, run: int = 4,
                         long_ngram: int = 6) -> RepetitionLoop | None:
    """The first loop in ``token_ids`` (the generated tokens only, not the prompt), or None."""
    if ngram < 1 or repeats < 2 or run < 2 or long_ngram <= ngram:
        raise ValueError(f'need ngram >= 1, repeats >= 2, run >= 2 and long_ngram > ngram; got {ngram}, {repeats}, '
                         f'{run}, {long_ngram}')
    ids = [int(t) for t in token_ids]
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            if i - start >= run:
                return RepetitionLoop((ids[start],), i - start, 'run')
            start = i
    counts = Counter(tuple(ids[i:i + ngram]) for i in range(len(ids) - ngram + 1))
    if counts:
        gram, count = counts.most_common(1)[0]
        if count >= repeats:
            return RepetitionLoop(gram, count, 'ngram')
    # a sentence said twice: the longest span of at least long_ngram tokens that occurs twice
    for length in range(len(ids) // 2, long_ngram - 1, -1):
        seen: dict[tuple[int, ...], int] = {}
        for i in range(len(ids) - length + 1):
            span = tuple(ids[i:i + length])
            if span in seen and i >= seen[span] + length:  # two occurrences that do not overlap
                return RepetitionLoop(span, 2, 'span')
            seen.setdefault(span, i)
    return None
