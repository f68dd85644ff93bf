"""Build the per-domain continuation benchmark (paper §5.2) from held-out text.

Steps, per domain:

1. Split held-out documents into sentences (lines for code) and take consecutive pairs
   (A, B) whose lengths are reasonable and that look linked (B shares a content word
   with the context or opens with a connective): the heuristic stand-in for "a causal
   link". The context is A (optionally with the sentences just before it), the right
   continuation is B with the whitespace that separated it from A.
2. Write a plausible wrong continuation, by one of two writers:

   - :class:`LLMWrongContinuationWriter` (the paper's variant): an LLM edits the context
     slightly so that it becomes wrong, then writes a reasonable continuation of the
     *edited* context of about B's length. The result reads fluently but follows from a
     wrong premise, so only a model that understood the real context prefers B.
   - :class:`OtherDocumentWrongWriter` (offline, **weaker variant**): the wrong
     continuation is real text of similar length from another document of the same
     domain (a random sentence, or with ``pairing='swap'`` the right continuation of
     another item, which cancels how typical each sentence is). Fluent and in-domain but
     unrelated to the context, so easier than the paper's items; items say so in
     ``meta['variant']`` / ``meta['weaker_variant']``.
3. Verify with a scorer and measure a margin (:class:`LLMJudgeVerifier`: judge score of
   (context, right) minus that of (context, wrong), each 0-10; :class:`ModelVerifier`:
   a reference causal LM's per-token log-likelihood of right minus wrong). Items the
   verifier does not prefer right on (margin <= 0) are dropped; the ``per_domain`` items
   with the largest margins are kept (400 in the paper). Without a verifier a seeded
   random sample of the candidates is kept.

Given the seed (and a deterministic LLM endpoint), the output is deterministic.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from drp_foundry.eval.continuation_scorer import ContinuationItem, score_items
from drp_foundry.eval.llm_client import ChatClient
from drp_foundry.fileio import read_jsonl, text_field

OFFLINE_VARIANT = 'offline_other_document'
LLM_VARIANT = 'llm_edited_context'
DEFAULT_CODE_DOMAINS = ('github',)

_SENTENCE_BREAK = re.compile(r'(?<=[.!?\u3002\uff01\uff1f])["\')\]]*\s+')
_CONTENT_WORD = re.compile(r'\w{4,}')
_CONNECTIVES = ('so', 'thus', 'therefore', 'hence', 'because', 'then', 'however', 'but', 'this', 'these',
                'as a result', 'consequently', 'since', 'that', 'it', 'they', 'which')


@dataclass(frozen=True)
class Segment:
    """A sentence (or code line) and the whitespace that separated it from the previous one."""

    text: str
    gap_before: str


@dataclass(frozen=True)
class Candidate:
    """A (context, right continuation) pair cut from document ``document`` of ``domain``."""

    domain: str
    document: int
    context: str
    right: str


def split_segments(text: str) -> list[Segment]:
    """Sentences within lines, lines within the document; gaps normalised to ' ' or '\\n'."""
    segments: list[Segment] = []
    for line in text.split('\n'):
        pieces = [p.strip() for p in _SENTENCE_BREAK.split(line)]
        first_in_line = True
        for piece in pieces:
            if not piece:
                continue
            gap = '' if not segments else ('\n' if first_in_line else ' ')
            segments.append(Segment(piece, gap))
            first_in_line = False
    return segments


def looks_linked(context: str, continuation: str) -> bool:
    """Heuristic "causal link": a shared content word (>= 4 word chars) or an opening connective."""
    opening = continuation.strip().lower()
    if any(opening == c or opening.startswith(c + ' ') or opening.startswith(c + ',') for c in _CONNECTIVES):
        return True
    context_words = {w.lower() for w in _CONTENT_WORD.findall(context)}
    return any(w.lower() in context_words for w in _CONTENT_WORD.findall(continuation))


def sentence_pairs(text: str, *, min_chars: int = 20, max_chars: int = 300, context_sentences: int = 1,
                   max_context_chars: int = 600, require_link: bool = True,
                   continuation_words: int | None = None) -> list[tuple[str, str]]:
    """(context, right) pairs from one document; ``right`` starts with its separating whitespace.

    ``continuation_words``: cut inside B so that the continuation is B's last that many
    words and the context ends with A and the rest of B (the paper's pairs may be "full
    sentences or half sentences"); pairs whose B is not longer are skipped. None: all of B.
    """
    segments = split_segments(text)
    pairs = []
    for j in range(len(segments) - 1):
        a, b = segments[j], segments[j + 1]
        if not (min_chars <= len(a.text) <= max_chars and min_chars <= len(b.text) <= max_chars):
            continue
        context = a.text
        for k in range(j - 1, max(j - context_sentences, -1), -1):
            longer = segments[k].text + segments[k + 1].gap_before + context
            if len(longer) > max_context_chars:
                break
            context = longer
        right = b.gap_before + b.text
        if continuation_words is not None:
            spaces = [m.start() for m in re.finditer(r' (?=\S)', b.text)]
            if len(spaces) <= continuation_words:
                continue
            cut = spaces[-continuation_words]
            context, right = context + b.gap_before + b.text[:cut], b.text[cut:]
        if require_link and not looks_linked(context, right):
            continue
        pairs.append((context, right))
    return pairs


class WrongContinuationWriter(Protocol):
    variant: str

    def write(self, candidates: Sequence[Candidate], wanted: int, rng: random.Random) -> list[ContinuationItem]:
        """Up to ``wanted`` items from ``candidates`` (in order); ``meta`` says how each wrong one was made."""


class Verifier(Protocol):
    name: str

    def margins(self, items: Sequence[ContinuationItem]) -> np.ndarray:
        """Per item, how much more the verifier believes the right continuation than the wrong one."""


def _leading_whitespace(text: str) -> str:
    return text[:len(text) - len(text.lstrip())]


class OtherDocumentWrongWriter:
    """Offline, weaker variant: the wrong continuation is real text from another document
    of the same domain, with the right one's leading whitespace.

    ``pairing='random'`` (default): a sentence drawn from another document, the closest in
    length among ``draws`` random draws (cut to its last ``continuation_words`` words when
    the candidates were). Easy items: the wrong sentence is unrelated to the context and
    may also read as a less natural continuation in general, so a model that merely knows
    the domain already scores above 50%.

    ``pairing='swap'`` (stricter): candidates (A1, B1) and (A2, B2) from different
    documents, same separating whitespace, similar lengths, become (A1, right B1, wrong B2)
    and (A2, right B2, wrong B1). Each continuation is right once and wrong once, so a
    model that ignores the context scores exactly 50% on a pair: accuracy above 50% is
    the use of context alone. A verifier keeps or drops a pair together
    (``meta['swap_pair']``).

    Args:
        documents: domain -> held-out texts (needed for ``'random'``: the sentence pool).
        draws: random draws compared for ``'random'``; window: following candidates
            searched for a ``'swap'`` partner.
    """

    variant = OFFLINE_VARIANT
    PAIRINGS = ('random', 'swap')

    def __init__(self, documents: dict[str, list[str]] | None = None, *, pairing: str = 'random', draws: int = 16,
                 window: int = 32, min_chars: int = 20, max_chars: int = 300, continuation_words: int | None = None):
        if pairing not in self.PAIRINGS:
            raise ValueError(f'pairing={pairing!r} must be one of {self.PAIRINGS}')
        if draws < 1 or window < 1:
            raise ValueError(f'draws and window must be >= 1, got draws={draws}, window={window}')
        if pairing == 'random' and documents is None:
            raise ValueError("pairing='random' needs the held-out documents (its sentence pool)")
        self.pairing, self.draws, self.window = pairing, draws, window
        self.pool: dict[str, list[tuple[int, str]]] = {}
        for domain, texts in (documents or {}).items():
            pool = []
            for d, text in enumerate(texts):
                for segment in split_segments(text):
                    if not min_chars <= len(segment.text) <= max_chars:
                        continue
                    words = segment.text.split(' ')
                    if continuation_words is None:
                        pool.append((d, segment.text))
                    elif len(words) > continuation_words:
                        pool.append((d, ' '.join(words[-continuation_words:])))
            self.pool[domain] = pool

    def write(self, candidates: Sequence[Candidate], wanted: int, rng: random.Random) -> list[ContinuationItem]:
        if self.pairing == 'swap':
            return self._write_swapped(candidates, wanted)
        items = []
        for candidate in candidates:
            if len(items) >= wanted:
                break
            drawn = self._draw(candidate, rng)
            if drawn is None:
                continue
            meta = {'variant': self.variant, 'weaker_variant': True, 'pairing': 'random',
                    'source_document': candidate.document, 'wrong_source_document': drawn[0]}
            items.append(ContinuationItem(candidate.context, candidate.right,
                                          _leading_whitespace(candidate.right) + drawn[1], candidate.domain, meta))
        return items

    def _draw(self, candidate: Candidate, rng: random.Random) -> tuple[int, str] | None:
        pool = self.pool.get(candidate.domain)
        if not pool:
            raise ValueError(f'domain {candidate.domain!r} has no sentence pool; pass its documents to '
                             'OtherDocumentWrongWriter')
        target = len(candidate.right.strip())
        best, valid_draws = None, 0
        for _ in range(self.draws * 8):
            document, text = pool[rng.randrange(len(pool))]
            if document == candidate.document:
                continue
            if best is None or abs(len(text) - target) < abs(len(best[1]) - target):
                best = (document, text)
            valid_draws += 1
            if valid_draws == self.draws:
                break
        return best

    def _write_swapped(self, candidates: Sequence[Candidate], wanted: int) -> list[ContinuationItem]:
        used: set[int] = set()
        items: list[ContinuationItem] = []
        for i, first in enumerate(candidates):
            if len(items) + 2 > wanted:
                break
            if i in used:
                continue
            gap, length = _leading_whitespace(first.right), len(first.right.strip())
            partner = None
            for j in range(i + 1, min(len(candidates), i + 1 + self.window)):
                other = candidates[j]
                if j in used or other.document == first.document or _leading_whitespace(other.right) != gap:
                    continue
                if partner is None or (abs(len(other.right.strip()) - length)
                                       < abs(len(candidates[partner].right.strip()) - length)):
                    partner = j
            if partner is None:
                continue
            used.update((i, partner))
            second = candidates[partner]
            pair_id = len(items) // 2
            for item_candidate, wrong_candidate in ((first, second), (second, first)):
                meta = {'variant': self.variant, 'weaker_variant': True, 'pairing': 'swap',
                        'source_document': item_candidate.document,
                        'wrong_source_document': wrong_candidate.document, 'swap_pair': pair_id}
                items.append(ContinuationItem(item_candidate.context, item_candidate.right, wrong_candidate.right,
                                              item_candidate.domain, meta))
        return items


EDIT_PROMPT_TEXT = ('Change the following passage slightly so that what it says becomes wrong or contradictory, '
                    'keeping its style, language and length. Reply with the changed passage only.')
EDIT_PROMPT_CODE = ('Change the following code slightly so that it stays syntactically valid but behaves '
                    'differently. Reply with the changed code only.')
CONTINUE_PROMPT_TEXT = ('Continue the following passage with about {n} words in the same style and language. '
                        'Reply with the continuation only.')
CONTINUE_PROMPT_CODE = 'Continue the following code with about {n} lines. Reply with the new code only.'
JUDGE_PROMPT_TEXT = ('You are given passage A and a continuation B. Rate from 0 to 10 how correctly and coherently '
                     'B continues A. Reply with a single number only.')
JUDGE_PROMPT_CODE = ('You are given code A and a completion B. Rate from 0 to 10 how correct B is as the next part '
                     'of A. Reply with a single number only.')


class LLMWrongContinuationWriter:
    """The paper's variant: the LLM edits the context into a wrong one, then continues the edited context."""

    variant = LLM_VARIANT

    def __init__(self, client: ChatClient, *, code_domains: Sequence[str] = DEFAULT_CODE_DOMAINS,
                 temperature: float = 0.8, model_name: str | None = None):
        self.client = client
        self.code_domains = set(code_domains)
        self.temperature = temperature
        self.model_name = model_name or getattr(client, 'model', type(client).__name__)

    def write_one(self, candidate: Candidate) -> ContinuationItem | None:
        """Edit the context, continue the edited context; None when the LLM returns nothing usable."""
        is_code = candidate.domain in self.code_domains
        edited = self.client.complete(EDIT_PROMPT_CODE if is_code else EDIT_PROMPT_TEXT, candidate.context,
                                      temperature=self.temperature, max_tokens=512).strip()
        if not edited or edited == candidate.context.strip():
            return None
        right = candidate.right.strip()
        length = max(1, len(right.splitlines()) if is_code else len(right.split()))
        prompt = (CONTINUE_PROMPT_CODE if is_code else CONTINUE_PROMPT_TEXT).format(n=length)
        wrong = self.client.complete(prompt, edited, temperature=self.temperature, max_tokens=256).strip()
        if not wrong or wrong == right:
            return None
        meta = {'variant': self.variant, 'weaker_variant': False, 'source_document': candidate.document,
                'edited_context': edited, 'llm_model': self.model_name}
        return ContinuationItem(candidate.context, candidate.right, _leading_whitespace(candidate.right) + wrong,
                                candidate.domain, meta)

    def write(self, candidates: Sequence[Candidate], wanted: int, rng: random.Random) -> list[ContinuationItem]:
        items: list[ContinuationItem] = []
        for candidate in candidates:
            if len(items) >= wanted:
                break
            item = self.write_one(candidate)
            if item is not None:
                items.append(item)
        return items


def _parse_score(reply: str) -> float | None:
    match = re.search(r'\d+(?:\.\d+)?', reply)
    if match is None:
        return None
    value = float(match.group())
    return value if 0 <= value <= 10 else None


class LLMJudgeVerifier:
    """margin = judge(context, right) - judge(context, wrong); items with judge(right) below
    ``min_right_score`` (no real link) or judge(wrong) above ``max_wrong_score`` get -inf."""

    def __init__(self, client: ChatClient, *, code_domains: Sequence[str] = DEFAULT_CODE_DOMAINS,
                 min_right_score: float = 5.0, max_wrong_score: float = 5.0):
        self.client = client
        self.code_domains = set(code_domains)
        self.min_right_score = min_right_score
        self.max_wrong_score = max_wrong_score
        self.name = f'llm_judge:{getattr(client, "model", type(client).__name__)}'

    def _judge(self, domain: str, context: str, continuation: str) -> float | None:
        prompt = JUDGE_PROMPT_CODE if domain in self.code_domains else JUDGE_PROMPT_TEXT
        separator = '\n\n\n' if domain in self.code_domains else '\n\n'
        reply = self.client.complete(prompt, f'A. {context}{separator}B. {continuation.strip()}',
                                     temperature=0.0, max_tokens=4)
        return _parse_score(reply)

    def margins(self, items: Sequence[ContinuationItem]) -> np.ndarray:
        margins = np.full(len(items), -np.inf)
        for i, item in enumerate(items):
            right = self._judge(item.domain, item.context, item.right)
            if right is None or right < self.min_right_score:
                continue
            wrong = self._judge(item.domain, item.context, item.wrong)
            if wrong is None or wrong > self.max_wrong_score:
                continue
            margins[i] = right - wrong
        return margins


class ModelVerifier:
    """margin = mean log p(right | context) - mean log p(wrong | context) under a reference LM.

    Use a model stronger than the ones you will evaluate (e.g. the unpruned source
    model): items are selected on its margins, so they favour what it gets right.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, name: str = 'reference_model'):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = f'model:{name}'

    def margins(self, items: Sequence[ContinuationItem]) -> np.ndarray:
        report = score_items(self.model, self.tokenizer, items, batch_size=self.batch_size)
        return report.margins('token_mean')


def read_domain_documents(sources: Sequence[str | Path], max_documents: int | None = None) -> dict[str, list[str]]:
    """domain -> document texts, from ``<domain>.jsonl`` files or folders of them (``text`` per line)."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(source.glob('*.jsonl'))
            if not found:
                raise FileNotFoundError(f'{source} holds no <domain>.jsonl files')
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise FileNotFoundError(f'held-out text source {source} does not exist')
    documents: dict[str, list[str]] = {}
    for path in files:
        domain = path.stem
        if domain in documents:
            raise ValueError(f'domain {domain!r} given twice ({path}); name each domain file once')
        texts = []
        for line_number, record in read_jsonl(path):
            texts.append(text_field(record, path, line_number))
            if max_documents is not None and len(texts) >= max_documents:
                break
        documents[domain] = texts
    return documents


def build_items(documents: dict[str, list[str]], writer: WrongContinuationWriter, *, per_domain: int = 400,
                verifier: Verifier | None = None, candidates_per_item: float = 2.0, seed: int = 0,
                min_chars: int = 20, max_chars: int = 300, context_sentences: int = 1,
                require_link: bool = True, continuation_words: int | None = None) -> list[ContinuationItem]:
    """Items for every domain of ``documents`` (held-out text): at most ``per_domain`` each.

    With a verifier, ``candidates_per_item * per_domain`` candidates are written and verified
    and the best ``per_domain`` by margin are kept; without one, exactly ``per_domain``
    random candidates are used. Domains with fewer candidates yield fewer items.
    """
    if per_domain < 1:
        raise ValueError(f'per_domain must be >= 1, got {per_domain}')
    if candidates_per_item < 1:
        raise ValueError(f'candidates_per_item must be >= 1, got {candidates_per_item}')
    items: list[ContinuationItem] = []
    for domain, texts in documents.items():
        rng = random.Random(f'{seed}:{domain}')
        candidates = [Candidate(domain, d, context, right) for d, text in enumerate(texts)
                      for context, right in sentence_pairs(text, min_chars=min_chars, max_chars=max_chars,
                                                           context_sentences=context_sentences,
                                                           require_link=require_link,
                                                           continuation_words=continuation_words)]
        if not candidates:
            raise ValueError(f'domain {domain!r}: no sentence pairs found in {len(texts)} documents; '
                             'check the text or lower min_chars')
        rng.shuffle(candidates)
        wanted = int(per_domain * candidates_per_item) if verifier is not None else per_domain
        domain_items = [ContinuationItem(item.context, item.right, item.wrong, item.domain, {**item.meta, 'seed': seed})
                        for item in writer.write(candidates, wanted, rng)]
        if verifier is not None and domain_items:
            domain_items = keep_largest_margins(domain_items, verifier.margins(domain_items), per_domain, verifier.name)
        items.extend(domain_items)
    return items


def keep_largest_margins(items: Sequence[ContinuationItem], margins: np.ndarray, per_domain: int,
                         verifier_name: str) -> list[ContinuationItem]:
    """Keep whole groups (a swap pair, else one item) whose every margin is > 0, largest
    smallest-margin first, up to ``per_domain`` items; record margin and verifier in ``meta``."""
    groups: dict[object, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.meta.get('swap_pair', ('item', i)), []).append(i)
    ranked = sorted((g for g in groups.values() if min(margins[i] for i in g) > 0),
                    key=lambda g: -min(margins[i] for i in g))
    kept: list[ContinuationItem] = []
    for group in ranked:
        if len(kept) + len(group) > per_domain:
            continue
        kept.extend(ContinuationItem(items[i].context, items[i].right, items[i].wrong, items[i].domain,
                                     {**items[i].meta, 'margin': float(margins[i]), 'verifier': verifier_name})
                    for i in group)
    return kept
