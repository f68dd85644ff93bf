"""SlimPajama and CulturaX through the ``datasets`` library -> the per-domain JSONL corpus of ``build_domain_mds``.

The paper prunes on RedPajama's seven domains (we read them from SlimPajama, its cleaned
and deduplicated release) and on eight CulturaX languages. This module streams either
corpus (``datasets.load_dataset(..., streaming=True)``: nothing is downloaded beyond what is
read), routes every document to its domain, stops each domain at its cap, and writes::

    OUT/<domain>/part-00000.jsonl, part-00001.jsonl, ...   one {"text": ...} per line
    OUT/hf_export.json                                     source, caps, counts per domain

which is the ``<domain>/*.jsonl`` layout ``drp-prepare-data --corpus OUT``
reads. Domains:

- SlimPajama (``cerebras/SlimPajama-627B``): the field ``meta.redpajama_set_name`` names the
  RedPajama subset; ``SLIMPAJAMA_DOMAINS`` maps it to the short names the recipes use
  (``cc``, ``c4-rp``, ``github``, ``book``, ``wiki``, ``arxiv``, ``stackexchange``).
- CulturaX (``uonlp/CulturaX``, gated: accept its terms and ``huggingface-cli login``): one
  dataset config per language (``en``, ``ru``, ...); the language code is the domain name.

A local copy in the same layout works the same way: pass ``dataset='json'`` and
``data_files`` (a glob of ``*.jsonl`` / ``*.jsonl.zst`` files for SlimPajama; for CulturaX a
pattern with ``{language}``, e.g. ``/data/culturax/{language}/*.jsonl``).

Caps: ``max_documents`` and ``max_characters`` (each an int for every domain, or a
``{domain: int}`` mapping); a domain is complete when it reaches either (the document that
crosses the character cap is kept). At least one cap is required: these corpora hold
hundreds of billions of tokens. Roughly 4 characters make one Llama-2 token in English.

Deterministic: the same source, caps and seed give byte-identical output (documents are
kept in stream order; ``shuffle_buffer > 0`` applies ``IterableDataset.shuffle(seed,
buffer_size)``, itself seeded). Each domain is written into a hidden ``.<domain>.partial``
folder (which ``build_domain_mds`` ignores) and renamed into place when done, so an
interrupted export never leaves a domain that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Union

from drp_foundry.fileio import atomic_write_text, replace_folder

log = logging.getLogger(__name__)

__all__ = ['SLIMPAJAMA', 'SLIMPAJAMA_DOMAINS', 'CULTURAX', 'CULTURAX_LANGUAGES', 'EXPORT_MANIFEST', 'DomainCap',
           'CorpusExportError', 'resolve_caps', 'export_records', 'export_slimpajama', 'export_culturax']

SLIMPAJAMA = 'cerebras/SlimPajama-627B'
SLIMPAJAMA_DOMAINS = {
    'RedPajamaCommonCrawl': 'cc',
    'RedPajamaC4': 'c4-rp',
    'RedPajamaGithub': 'github',
    'RedPajamaBook': 'book',
    'RedPajamaWikipedia': 'wiki',
    'RedPajamaArXiv': 'arxiv',
    'RedPajamaStackExchange': 'stackexchange',
}
CULTURAX = 'uonlp/CulturaX'
CULTURAX_LANGUAGES = ('en', 'ru', 'zh', 'ja', 'ar', 'tr', 'ko', 'th')  # the paper's multilingual setting
EXPORT_MANIFEST = 'hf_export.json'
DEFAULT_DOCS_PER_FILE = 100_000

Cap = Union[int, Mapping[str, int], None]


class CorpusExportError(ValueError):
    """Bad source, caps or output folder; the message names the option, field or path and the fix."""


@dataclass(frozen=True)
class DomainCap:
    """When one domain is complete: ``max_documents`` documents or ``max_characters`` characters."""

    max_documents: int | None = None
    max_characters: int | None = None

    def reached(self, documents: int, characters: int) -> bool:
        return ((self.max_documents is not None and documents >= self.max_documents)
                or (self.max_characters is not None and characters >= self.max_characters))


def _per_domain(value: Cap, domains: list[str], option: str) -> dict[str, int | None]:
    if value is None or isinstance(value, int):
        if isinstance(value, bool) or (value is not None and value < 1):
            raise CorpusExportError(f'{option} must be a positive integer, got {value!r}')
        return {domain: value for domain in domains}
    if not isinstance(value, Mapping):
        raise CorpusExportError(f'{option} must be an integer or a {{domain: integer}} mapping, got {value!r}')
    unknown = sorted(set(value) - set(domains))
    if unknown:
        raise CorpusExportError(f'{option} names unknown domains {unknown}; the exported domains are {domains}')
    for domain, cap in value.items():
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise CorpusExportError(f'{option}[{domain!r}] must be a positive integer, got {cap!r}')
    return {domain: value.get(domain) for domain in domains}


def resolve_caps(domains: Iterable[str], max_documents: Cap = None, max_characters: Cap = None) -> dict[str, DomainCap]:
    """One ``DomainCap`` per domain; every domain must get at least one cap."""
    domains = list(domains)
    if not domains:
        raise CorpusExportError('no domains to export; name at least one domain (or language)')
    documents = _per_domain(max_documents, domains, 'max_documents')
    characters = _per_domain(max_characters, domains, 'max_characters')
    uncapped = [d for d in domains if documents[d] is None and characters[d] is None]
    if uncapped:
        raise CorpusExportError(f'domains {uncapped} have no cap: give max_documents and/or max_characters for '
                                'every domain (these corpora hold hundreds of billions of tokens)')
    return {d: DomainCap(documents[d], characters[d]) for d in domains}


class _DomainWriter:
    """``<out>/.<domain>.partial/part-NNNNN.jsonl`` files, renamed to ``<out>/<domain>/`` by ``finish``."""

    def __init__(self, out: Path, domain: str, docs_per_file: int):
        self.final = out / domain
        self.partial = out / f'.{domain}.partial'
        shutil.rmtree(self.partial, ignore_errors=True)  # left by an interrupted export
        self.partial.mkdir(parents=True)
        self.docs_per_file = docs_per_file
        self.documents = 0
        self.characters = 0
        self._file = None

    def write(self, text: str) -> None:
        if self.documents % self.docs_per_file == 0:
            self._close_file()
            self._file = open(self.partial / f'part-{self.documents // self.docs_per_file:05d}.jsonl', 'w',
                              encoding='utf-8')
        self._file.write(json.dumps({'text': text}, ensure_ascii=False) + '\n')
        self.documents += 1
        self.characters += len(text)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        self._close_file()
        self.final.with_name(f'{self.final.name}.jsonl').unlink(missing_ok=True)  # one layout per domain
        replace_folder(self.partial, self.final)

    def abort(self) -> None:
        self._close_file()
        shutil.rmtree(self.partial, ignore_errors=True)


def _check_output(out: Path, domains: list[str], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CorpusExportError(f'output path {out} exists and is not a folder; choose another --out')
    existing = [d for d in domains if (out / d).exists() or (out / f'{d}.jsonl').exists()]
    if existing and not overwrite:
        raise CorpusExportError(f'{out} already holds domains {existing}; pass --overwrite (overwrite=True) to '
                                'replace them, or choose another --out')


def _record_text(record: Mapping[str, Any], where: str) -> str:
    text = record.get('text') if isinstance(record, Mapping) else None
    if not isinstance(text, str):
        fields = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise CorpusExportError(f'{where}: no string field "text" (fields: {fields}); the source must have the '
                                'SlimPajama / CulturaX layout')
    return text


def export_records(records: Iterable[Mapping[str, Any]], out: str | os.PathLike, domain_of: Callable[[Mapping], str],
                   caps: Mapping[str, DomainCap], *, source: Mapping[str, Any], docs_per_file: int = DEFAULT_DOCS_PER_FILE,
                   overwrite: bool = False, source_name: str = 'source') -> dict[str, Any]:
    """Route ``records`` to their domains until every domain in ``caps`` is complete or the stream ends.

    ``domain_of(record)`` names the record's domain; records of domains not in ``caps`` are
    skipped. Empty texts are skipped. Writes ``OUT/<domain>/*.jsonl`` and merges the
    counts and ``source`` into ``OUT/hf_export.json``; returns that manifest.
    """
    out = Path(out)
    if docs_per_file < 1:
        raise CorpusExportError(f'docs_per_file must be >= 1, got {docs_per_file}')
    domains = list(caps)
    _check_output(out, domains, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    writers = {domain: _DomainWriter(out, domain, docs_per_file) for domain in domains}
    open_domains = set(domains)
    try:
        for index, record in enumerate(records):
            domain = domain_of(record)
            if domain not in open_domains:
                continue
            text = _record_text(record, f'{source_name} record {index}')
            if not text:
                continue
            writer = writers[domain]
            writer.write(text)
            if caps[domain].reached(writer.documents, writer.characters):
                open_domains.discard(domain)
                if not open_domains:
                    break
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.finish()

    manifest_path = out / EXPORT_MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {'domains': {}}
    for domain in domains:
        writer = writers[domain]
        reached = caps[domain].reached(writer.documents, writer.characters)
        if not reached:
            log.warning('%s: the source ran out after %d documents, before the cap %s', domain, writer.documents,
                        caps[domain])
        manifest['domains'][domain] = {'documents': writer.documents, 'characters': writer.characters,
                                       'reached_cap': reached, 'cap': asdict(caps[domain]), 'source': dict(source)}
        log.info('%s: %d documents, %d characters', domain, writer.documents, writer.characters)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _stream(dataset: str, config_name: str | None, data_files: Any, split: str, shuffle_buffer: int, seed: int):
    import datasets

    if shuffle_buffer < 0:
        raise CorpusExportError(f'shuffle_buffer must be >= 0, got {shuffle_buffer}')
    try:
        stream = datasets.load_dataset(dataset, config_name, data_files=data_files, split=split, streaming=True)
    except FileNotFoundError as error:
        raise CorpusExportError(f'cannot open dataset {dataset!r} (config {config_name!r}, data_files '
                                f'{data_files!r}, split {split!r}): {error}. Check the hub name / local files; '
                                'gated datasets need `huggingface-cli login`') from error
    if shuffle_buffer:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return stream


def _slimpajama_domain(record: Mapping[str, Any]) -> str:
    meta = record.get('meta') if isinstance(record, Mapping) else None
    if isinstance(meta, str):  # some copies store meta as a JSON string
        meta = json.loads(meta)
    name = meta.get('redpajama_set_name') if isinstance(meta, Mapping) else None
    if name not in SLIMPAJAMA_DOMAINS:
        raise CorpusExportError(f'SlimPajama record with meta.redpajama_set_name={name!r}; expected one of '
                                f'{sorted(SLIMPAJAMA_DOMAINS)}. Is this SlimPajama (fields text, meta)?')
    return SLIMPAJAMA_DOMAINS[name]


def export_slimpajama(out: str | os.PathLike, *, dataset: str = SLIMPAJAMA, data_files: Any = None,
                      split: str = 'train', domains: Iterable[str] | None = None, max_documents: Cap = None,
                      max_characters: Cap = None, shuffle_buffer: int = 0, seed: int = 17,
                      docs_per_file: int = DEFAULT_DOCS_PER_FILE, overwrite: bool = False) -> dict[str, Any]:
    """Stream SlimPajama (or a local copy: ``dataset='json'``, ``data_files=...``) into ``OUT/<domain>/``.

    ``domains``: short names (default all seven of ``SLIMPAJAMA_DOMAINS``).
    """
    known = list(SLIMPAJAMA_DOMAINS.values())
    domains = known if domains is None else list(domains)
    unknown = sorted(set(domains) - set(known))
    if unknown:
        raise CorpusExportError(f'domains {unknown} are not SlimPajama domains; choose from {known}')
    caps = resolve_caps(domains, max_documents, max_characters)
    records = _stream(dataset, None, data_files, split, shuffle_buffer, seed)
    source = {'dataset': dataset, 'data_files': data_files, 'split': split, 'shuffle_buffer': shuffle_buffer,
              'seed': seed}
    return export_records(records, out, _slimpajama_domain, caps, source=source, docs_per_file=docs_per_file,
                          overwrite=overwrite, source_name=dataset)


def export_culturax(out: str | os.PathLike, *, languages: Iterable[str] = CULTURAX_LANGUAGES, dataset: str = CULTURAX,
                    data_files: str | None = None, split: str = 'train', max_documents: Cap = None,
                    max_characters: Cap = None, shuffle_buffer: int = 0, seed: int = 17,
                    docs_per_file: int = DEFAULT_DOCS_PER_FILE, overwrite: bool = False) -> dict[str, Any]:
    """Stream each CulturaX language config (or local files: ``data_files`` with ``{language}``) into ``OUT/<lang>/``."""
    languages = list(languages)
    if len(set(languages)) != len(languages):
        raise CorpusExportError(f'languages {languages} repeat a language')
    if data_files is not None and '{language}' not in str(data_files):
        raise CorpusExportError(f'data_files {data_files!r} must contain {{language}} (one file set per language), '
                                'e.g. /data/culturax/{language}/*.jsonl')
    caps = resolve_caps(languages, max_documents, max_characters)
    manifest: dict[str, Any] = {}
    for language in languages:
        files = None if data_files is None else str(data_files).format(language=language)
        config_name = None if data_files is not None else language
        records = _stream(dataset, config_name, files, split, shuffle_buffer, seed)
        source = {'dataset': dataset, 'config': config_name, 'data_files': files, 'split': split,
                  'shuffle_buffer': shuffle_buffer, 'seed': seed}
        manifest = export_records(records, out, lambda record, lang=language: lang, {language: caps[language]},
                                  source=source, docs_per_file=docs_per_file, overwrite=overwrite,
                                  source_name=f'{dataset}[{language}]')
    return manifest


def _parse_caps(items: list[str] | None, option: str) -> Cap:
    """``['50000']`` -> 50000; ``['1000', 'cc=5000']`` -> per domain (the bare number is the default)."""
    if not items:
        return None
    default, per_domain = None, {}
    for item in items:
        key, sep, value = item.rpartition('=')
        try:
            number = int(value)
        except ValueError:
            raise CorpusExportError(f'{option} {item!r}: expected N or DOMAIN=N with an integer N') from None
        if sep:
            per_domain[key] = number
        else:
            default = number
    return default if not per_domain else {'__default__': default, **per_domain}


def _expand_caps(cap: Cap, domains: list[str]) -> Cap:
    if not isinstance(cap, dict) or '__default__' not in cap:
        return cap
    default = cap.pop('__default__')
    return {**{d: default for d in domains if default is not None}, **cap}
