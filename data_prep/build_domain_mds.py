"""Per-domain JSONL corpus -> per-domain MDS shards with a train and a held-out eval split.

Input: a corpus folder holding, per domain, either one file ``<domain>.jsonl`` (or
``<domain>.jsonl.gz`` / ``<domain>.jsonl.zst``) or a folder ``<domain>/`` of such files;
one JSON object per line with a ``text`` field, UTF-8. A domain given twice (a file and a
folder, or two files) is refused, and so is any other compressed or data-looking file
(``.bz2``, ``.xz``, ``.parquet``, ...), by name: nothing in the corpus is skipped silently.

Output (``OUT``), the layout the rest of drp-foundry reads (docs/DESIGN.md)::

    OUT/<domain>/train/   MDS, column tokens: ndarray:int32, max_seq_len tokens a sample
    OUT/<domain>/eval/    same, held out
    OUT/tokenizer/        only when the tokenizer was trained here (--train-tokenizer)
    OUT/manifest.json     domains, sample counts, seq length, tokenizer, seed, and the
                          content fingerprint of every source file, and per domain and
                          split what the shards are (index sha256, shard sizes and sha1;
                          drp_foundry/data/shard_integrity.py checks them) (written last)

Encoding: documents are shuffled with ``seed``, tokenised, an EOS token is appended to
each, and the token stream is cut into samples of exactly ``max_seq_len`` tokens (the
tail that does not fill a sample is dropped). This is LLM-Foundry's concatenated-token
format, so its ``text`` dataloader reads these shards too. The last ``eval_fraction``
of a domain's samples (at least ``min_eval_samples``, at most ``max_eval_samples``)
form the eval split; they come from the last documents in the shuffled order, so only
one document can straddle the split.

All or nothing: the whole data root is built in a hidden staging folder beside ``OUT``
(``.<OUT name>.staging``) and swapped in with renames once its manifest is written, so a
killed build never leaves a mix of old and new domains, tokenizers or settings in ``OUT``.

Never stale: the manifest's fingerprint covers the settings, the tokenizer files and the
content of every source file (size and SHA-256, read in streaming). A rerun with the same
inputs is a no-op; any change (a document added, another tokenizer, another seed) is
refused with what changed named, or rebuilt with ``--overwrite``. ``--overwrite`` rebuilds
the whole data root; it refuses to drop domains the root holds (list them in ``--domains``)
and never deletes a folder data_prep did not write.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from drp_foundry.data.manifest import MANIFEST, ManifestError, read_manifest, tokenizer_identity
from drp_foundry.data.shard_integrity import describe_split
from drp_foundry.fileio import JSONLError, atomic_folder, iter_jsonl, text_field

log = logging.getLogger(__name__)

BUILDING = '.building'  # holds the fingerprint of an unfinished build, so a rerun may finish it
SPLITS = ('train', 'eval')


class DataPrepError(ValueError):
    """Bad corpus or settings; the message names the path or option and the fix."""


@dataclass(frozen=True)
class PrepSettings:
    max_seq_len: int = 256
    seed: int = 17
    eval_fraction: float = 0.05
    min_eval_samples: int = 4
    max_eval_samples: int = 64
    max_train_samples: int | None = None
    tokenizer: str = ''

    def validate(self) -> None:
        if self.max_seq_len < 2:
            raise DataPrepError(f'--max-seq-len must be >= 2, got {self.max_seq_len}')
        if not 0.0 < self.eval_fraction < 1.0:
            raise DataPrepError(f'--eval-fraction must be in (0, 1), got {self.eval_fraction}')
        if self.min_eval_samples < 1 or self.max_eval_samples < self.min_eval_samples:
            raise DataPrepError('--min-eval-samples must be >= 1 and <= --max-eval-samples '
                                f'(got {self.min_eval_samples} and {self.max_eval_samples})')

    def fingerprint(self, domains: list[str], sources: dict | None = None, tokenizer_sha256: str | None = None) -> str:
        payload = json.dumps({**asdict(self), 'domains': domains, 'sources': sources,
                              'tokenizer_sha256': tokenizer_sha256}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Streaming SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprints(domain_files: dict[str, list[Path]], corpus: Path) -> dict[str, list[dict]]:
    """{domain: [{file (relative to the corpus), bytes, sha256}]}: what the build reads."""
    return {domain: [{'file': f.relative_to(corpus).as_posix(), 'bytes': f.stat().st_size, 'sha256': file_sha256(f)}
                     for f in files]
            for domain, files in domain_files.items()}


# The files that define a tokenizer's ids (whichever of them a tokenizer folder has).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'spiece.model', 'vocab.json', 'merges.txt', 'vocab.txt',
                   'special_tokens_map.json', 'added_tokens.json')


def tokenizer_sha256(folder: str | Path) -> str | None:
    """One SHA-256 over the id-defining files of a tokenizer folder (None when it has none of them)."""
    folder = Path(folder)
    h, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            found = True
            h.update(name.encode() + b'\0' + file_sha256(folder / name).encode())
    return h.hexdigest() if found else None


def describe_change(old: dict, new: dict) -> str:
    """What differs between two manifests' inputs, in words (files, settings, domains, tokenizer)."""
    changes = []
    old_sources, new_sources = old.get('sources') or {}, new.get('sources') or {}
    if not old_sources:
        changes.append('the old build has no content fingerprint (made by an older data_prep)')
    for domain in new_sources:
        before = {f['file']: f for f in old_sources.get(domain, [])}
        for f in new_sources[domain]:
            b = before.pop(f['file'], None)
            if b is None and old_sources:
                changes.append(f'{f["file"]} is new')
            elif b is not None and (b['bytes'], b['sha256']) != (f['bytes'], f['sha256']):
                changes.append(f'{f["file"]} changed ({b["bytes"]} -> {f["bytes"]} bytes)')
        changes.extend(f'{name} is gone' for name in before)
    old_settings, new_settings = old.get('settings') or {}, new.get('settings') or {}
    changes.extend(f'setting {key}: {old_settings.get(key)!r} -> {new_settings[key]!r}'
                   for key in new_settings if old_settings.get(key) != new_settings[key])
    if old.get('tokenizer_sha256') != new.get('tokenizer_sha256') and old.get('tokenizer_sha256') is not None:
        changes.append('the tokenizer files differ')
    if sorted(old.get('domains') or {}) != sorted(new.get('domains') or {}):
        changes.append(f'domains {sorted(old.get("domains") or {})} -> {sorted(new.get("domains") or {})}')
    return '; '.join(changes) or 'the fingerprint differs'


def staging_dir(out: Path) -> Path:
    return out.parent / f'.{out.name}.staging'


def _old_dir(out: Path) -> Path:
    return out.parent / f'.{out.name}.old'


def _ours(out: Path, manifest: dict | None) -> list[str]:
    """Entries of ``out`` that data_prep did not write (empty: safe to replace the whole folder)."""
    expected = {MANIFEST, 'tokenizer'} | set((manifest or {}).get('domains') or {})
    return sorted(p.name for p in out.iterdir() if not p.name.startswith('.') and p.name not in expected)


def _finish_interrupted_swap(out: Path) -> None:
    """A kill between the two renames of a swap leaves OUT missing and a complete staging folder: finish it."""
    staging = staging_dir(out)
    if not out.exists() and (staging / MANIFEST).is_file() and not (staging / BUILDING).exists():
        os.replace(staging, out)
        log.info('finished the interrupted swap of %s', out)
    if out.exists():
        shutil.rmtree(_old_dir(out), ignore_errors=True)


# Readable inputs: the suffix and how to open it as text.
SUPPORTED_SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst')
# Files that look like data or archives but cannot be read here: refused, never skipped.
_REFUSED_SUFFIXES = ('.gz', '.zst', '.zstd', '.bz2', '.xz', '.lz4', '.lzma', '.zip', '.7z', '.tar', '.tgz',
                     '.parquet', '.arrow', '.csv', '.tsv', '.txt', '.json')
# Metadata files that sit beside the domains (written by data_prep/hf_corpora.py): ignored.
_KNOWN_METADATA = ('hf_export.json', 'manifest.json', 'README.md', 'README')


def _supported_stem(name: str) -> str | None:
    """The domain name of a readable input file (``wiki.jsonl.gz`` -> ``wiki``), else None."""
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _refused_stem(name: str) -> str | None:
    """The would-be domain of a data-looking file we cannot read (``wiki.jsonl.bz2`` -> ``wiki``), else None."""
    if name in _KNOWN_METADATA:
        return None
    lower = name.lower()
    if '.jsonl' in lower:
        return name[: lower.index('.jsonl')]
    if lower.endswith(_REFUSED_SUFFIXES):
        return name.split('.', 1)[0]
    return None


def _unsupported(path: Path) -> DataPrepError:
    return DataPrepError(f'{path}: cannot read this file type; a domain file must be one of '
                         f'{", ".join("*" + s for s in SUPPORTED_SUFFIXES)} (JSON lines with a "text" field). '
                         'Convert it, or move it out of the corpus folder')


def find_domain_files(corpus: Path, domains: list[str] | None = None) -> dict[str, list[Path]]:
    """Map each domain to its JSONL files. ``domains=None`` takes every domain in ``corpus``.

    A domain must come from exactly one source: a file (``.jsonl``, ``.jsonl.gz`` or
    ``.jsonl.zst``) or a folder of such files. Two sources for one domain, or a compressed
    / data-looking file of another format, are refused with the paths named.
    """
    if not corpus.is_dir():
        raise DataPrepError(f'corpus folder {corpus} does not exist; pass --corpus DIR holding '
                            '<domain>.jsonl(.gz|.zst) files or <domain>/ folders of them')
    sources: dict[str, list[Path]] = {}  # domain -> every file or folder that claims it
    files_of: dict[Path, list[Path]] = {}
    refused: dict[str, Path] = {}
    for entry in sorted(corpus.iterdir()):
        if entry.name.startswith('.'):
            continue  # hidden: partial outputs of hf_corpora, editor files
        if entry.is_dir():
            inner, bad = [], []
            for f in sorted(entry.iterdir()):
                if f.name.startswith('.') or not f.is_file():
                    continue
                if _supported_stem(f.name) is not None:
                    inner.append(f)
                elif _refused_stem(f.name) is not None:
                    bad.append(f)
                else:
                    log.warning('%s: not a domain file (*.jsonl, *.jsonl.gz, *.jsonl.zst); ignored', f)
            if bad:
                refused.setdefault(entry.name, bad[0])
            if inner:
                sources.setdefault(entry.name, []).append(entry)
                files_of[entry] = inner
        elif entry.is_file():
            stem = _supported_stem(entry.name)
            if stem is not None:
                sources.setdefault(stem, []).append(entry)
                files_of[entry] = [entry]
            elif (bad_stem := _refused_stem(entry.name)) is not None:
                refused.setdefault(bad_stem, entry)
            elif entry.name not in _KNOWN_METADATA:
                log.warning('%s: not a domain file (*.jsonl, *.jsonl.gz, *.jsonl.zst); ignored', entry)
    wanted = set(domains) if domains is not None else set(sources) | set(refused)
    for domain in sorted(wanted & set(refused)):
        raise _unsupported(refused[domain])
    for domain in sorted(wanted & set(sources)):
        if len(sources[domain]) > 1:
            both = ' and '.join(str(p) + ('/' if p.is_dir() else '') for p in sources[domain])
            raise DataPrepError(f'domain {domain!r} is given twice: {both}. Keep one (merge the documents into '
                                'one file or one folder), or rename one of them to another domain')
    found = {d: files_of[paths[0]] for d, paths in sources.items()}
    if domains is None:
        if not found:
            raise DataPrepError(f'no <domain>.jsonl(.gz|.zst) file or <domain>/ folder of them in {corpus}')
        return found
    missing = [d for d in domains if d not in found]
    if missing:
        raise DataPrepError(
            f'domain(s) {missing} not found in {corpus}: expected {corpus}/<domain>.jsonl (.gz, .zst) or a '
            f'folder {corpus}/<domain>/ of such files; domains present: {sorted(found)}')
    return {d: found[d] for d in domains}


class _ZstdFrames(io.RawIOBase):
    """Read every zstd frame of a file in turn; a truncated last frame is an error, not an early end."""

    def __init__(self, path: Path):
        import zstandard

        self._file = open(path, 'rb')
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._obj = self._new()
        self._buffer = b''
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self._buffer:
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError('the last zstd frame is truncated')
                return 0
            while chunk:
                self._in_frame = True
                self._buffer += self._obj.decompress(chunk)
                chunk = b''
                if self._obj.eof:
                    chunk, self._obj, self._in_frame = self._obj.unused_data, self._new(), False
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def open_text(path: Path):
    """Open a domain file as UTF-8 text, decompressing ``.gz`` / ``.zst`` on the fly."""
    name = path.name
    if name.endswith('.jsonl.gz'):
        return gzip.open(path, 'rt', encoding='utf-8')
    if name.endswith('.jsonl.zst'):
        return io.TextIOWrapper(io.BufferedReader(_ZstdFrames(path)), encoding='utf-8')
    return open(path, encoding='utf-8')


def read_documents(files: list[Path]) -> list[str]:
    """All ``text`` fields of the files, in order; errors name the file and line."""
    docs: list[str] = []
    for path in files:
        line_no = 0
        try:
            with open_text(path) as f:
                for line_no, record in iter_jsonl(f, path):
                    text = text_field(record, path, line_no)
                    if text:
                        docs.append(text)
        except JSONLError as err:
            raise DataPrepError(str(err)) from None
        except UnicodeDecodeError as err:
            raise DataPrepError(f'{path}:{line_no + 1}: not UTF-8 text ({err.reason} at byte {err.start} of the '
                                'line); is it a binary file? Re-encode it as UTF-8 JSON lines') from err
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; truncated archives raise EOFError
            raise DataPrepError(f'{path}: cannot be read as {path.suffix} ({err}); is the file complete?') from err
        except Exception as err:  # zstandard.ZstdError (not a subclass of OSError)
            if type(err).__module__.startswith('zstandard') or type(err).__name__ == 'ZstdError':
                raise DataPrepError(f'{path}: cannot be read as zstd ({err}); is the file complete?') from err
            raise
    if not docs:
        raise DataPrepError(f'{", ".join(map(str, files))}: no documents with non-empty "text"; '
                            'remove the domain or add data')
    return docs


def tokens_to_samples(docs: list[str], tokenizer, max_seq_len: int, seed: int, desc: str = '',
                      progress: bool | None = None) -> np.ndarray:
    """Shuffle documents, tokenise, append EOS to each, cut into (n, max_seq_len) int32 samples.

    A progress bar (characters tokenised) named ``desc`` shows on a terminal; ``progress`` forces it on or off.
    """
    from data_prep.progress import progress_bar

    order = np.random.default_rng(seed).permutation(len(docs))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataPrepError('the tokenizer has no eos_token; choose a tokenizer with an EOS token')
    tokenizer.model_max_length = 1 << 62  # whole documents are encoded, then cut; no length warning
    chunks = []
    batch = 64
    with progress_bar(total=sum(len(d) for d in docs), desc=desc, unit='char',
                      disable=None if progress is None else not progress) as bar:
        for start in range(0, len(order), batch):
            texts = [docs[i] for i in order[start:start + batch]]
            for ids in tokenizer(texts, add_special_tokens=False)['input_ids']:
                chunks.append(np.asarray(ids, dtype=np.int64))
                chunks.append(np.asarray([eos], dtype=np.int64))
            bar.update(sum(len(text) for text in texts))
    stream = np.concatenate(chunks)
    if stream.max(initial=0) >= np.iinfo(np.int32).max:
        raise DataPrepError('token ids do not fit int32')
    n = len(stream) // max_seq_len
    return stream[: n * max_seq_len].astype(np.int32).reshape(n, max_seq_len)


def split_counts(n_samples: int, settings: PrepSettings, domain: str = 'this domain') -> tuple[int, int]:
    """(train, eval) sample counts for a domain with ``n_samples`` samples."""
    n_eval = int(round(settings.eval_fraction * n_samples))
    n_eval = min(max(n_eval, settings.min_eval_samples), settings.max_eval_samples)
    n_train = n_samples - n_eval
    if n_train < 1:
        raise DataPrepError(f'domain {domain!r}: only {n_samples} samples of {settings.max_seq_len} tokens, too few '
                            f'for a train and an eval split (needs at least {settings.min_eval_samples + 1}); lower '
                            '--max-seq-len or --min-eval-samples, add data, or leave the domain out (--domains)')
    if settings.max_train_samples is not None:
        n_train = min(n_train, settings.max_train_samples)
    return n_train, n_eval


def write_mds_split(samples: np.ndarray, out_dir: Path) -> None:
    """Write ``samples`` as an MDS dataset at ``out_dir`` atomically (temp folder + rename)."""
    from streaming import MDSWriter

    with atomic_folder(out_dir) as tmp:
        with MDSWriter(out=str(tmp), columns={'tokens': 'ndarray:int32'}, size_limit=1 << 26,
                       hashes=['sha1']) as writer:  # in index.json: streaming's validate_hash checks them
            for row in samples:
                writer.write({'tokens': row})


def load_or_train_tokenizer(tokenizer: str | None, train_vocab: int | None, corpus_docs: dict[str, list[str]],
                            out: Path):
    from transformers import AutoTokenizer

    if bool(tokenizer) == bool(train_vocab):
        raise DataPrepError('pass exactly one of --tokenizer DIR (a local Hugging Face tokenizer folder) '
                            'or --train-tokenizer VOCAB_SIZE')
    if tokenizer:
        if not Path(tokenizer).is_dir():
            raise DataPrepError(f'--tokenizer {tokenizer}: not a local folder; nothing is downloaded here, '
                                'point it at a saved Hugging Face tokenizer directory')
        return AutoTokenizer.from_pretrained(tokenizer), str(Path(tokenizer).resolve())
    from data_prep.tokenizer import train_bpe_tokenizer

    texts = [doc for docs in corpus_docs.values() for doc in docs]
    tok_dir = out / 'tokenizer'
    with atomic_folder(tok_dir) as tmp:
        train_bpe_tokenizer(texts, vocab_size=train_vocab, out_dir=tmp)
    return AutoTokenizer.from_pretrained(str(tok_dir)), f'trained:{train_vocab}'


def build_domain_mds(corpus: str | Path, out: str | Path, *, domains: list[str] | None = None,
                     tokenizer: str | None = None, train_tokenizer_vocab: int | None = None,
                     settings: PrepSettings = PrepSettings(), overwrite: bool = False) -> dict:
    """Build the per-domain train/eval MDS splits; returns the manifest (also written to OUT)."""
    corpus, out = Path(corpus), Path(out)
    settings.validate()
    if bool(tokenizer) == bool(train_tokenizer_vocab):
        raise DataPrepError('pass exactly one of --tokenizer DIR (a local Hugging Face tokenizer folder) '
                            'or --train-tokenizer VOCAB_SIZE')
    if tokenizer and not Path(tokenizer).is_dir():
        raise DataPrepError(f'--tokenizer {tokenizer}: not a local folder; nothing is downloaded here, '
                            'point it at a saved Hugging Face tokenizer directory')
    domain_files = find_domain_files(corpus, domains)
    names = list(domain_files)
    tok_key = tokenizer and str(Path(tokenizer).resolve()) or f'trained:{train_tokenizer_vocab}'
    settings = PrepSettings(**{**asdict(settings), 'tokenizer': tok_key})
    sources = source_fingerprints(domain_files, corpus)
    given_tok_sha = tokenizer_sha256(tokenizer) if tokenizer else None
    # a trained tokenizer is a function of the corpus and the vocab size, both in the fingerprint
    fingerprint = settings.fingerprint(names, sources, given_tok_sha)
    wanted = {'settings': asdict(settings), 'sources': sources, 'tokenizer_sha256': given_tok_sha,
              'domains': dict.fromkeys(names)}

    _finish_interrupted_swap(out)
    manifest_path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise DataPrepError(f'--out {out} is a file; choose a folder')
    if manifest_path.exists():
        try:
            old = read_manifest(out) or {}
        except ManifestError as err:
            raise DataPrepError(f'{err}; or remove it and build again') from None
        if old.get('fingerprint') == fingerprint and all((out / d / s / 'index.json').exists()
                                                         for d in names for s in SPLITS):
            log.info('%s is up to date (same corpus content, domains and settings); nothing to do', out)
            return old
        change = describe_change({**old, 'tokenizer_sha256': old.get('tokenizer_sha256', given_tok_sha)}, wanted)
        if not overwrite:
            raise DataPrepError(f'{out} was built from other inputs ({change}); pass --overwrite to rebuild the whole '
                                'data root, or choose another --out')
        dropped = sorted(set(old.get('domains') or {}) - set(names))
        if dropped:
            raise DataPrepError(f'--overwrite rebuilds all of {out} (one tokenizer and one set of settings for every '
                                f'domain), but this build lacks its domains {dropped}; add them to --domains (they are '
                                'retokenised too), remove them from the folder yourself, or choose another --out')
        foreign = _ours(out, old)
        if foreign:
            raise DataPrepError(f'{out} holds {foreign}, which data_prep did not write; --overwrite would delete them. '
                                'Move them out, or choose another --out')
    elif out.exists() and any(not p.name.startswith('.') for p in out.iterdir()):
        raise DataPrepError(f'{out} exists, is not empty and has no {MANIFEST}, so it is not a data_prep output '
                            '(or an old build was killed); data_prep never deletes what it did not write: choose an '
                            'empty --out, or remove the folder yourself')

    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)  # a killed build's leftovers: always rebuilt from scratch
    staging.mkdir(parents=True)
    (staging / BUILDING).write_text(fingerprint)

    docs = {d: read_documents(files) for d, files in domain_files.items()}
    tok, tok_desc = load_or_train_tokenizer(tokenizer, train_tokenizer_vocab, docs, staging)
    tok_sha = given_tok_sha if tokenizer else tokenizer_sha256(staging / 'tokenizer')

    manifest = {'fingerprint': fingerprint, 'settings': asdict(settings), 'tokenizer': tok_desc,
                'tokenizer_sha256': tok_sha, 'tokenizer_identity': tokenizer_identity(tok), 'vocab_size': len(tok), 'eos_token_id': tok.eos_token_id,
                'corpus': str(corpus.resolve()), 'sources': sources, 'domains': {}}
    for i, (domain, domain_docs) in enumerate(docs.items()):
        samples = tokens_to_samples(domain_docs, tok, settings.max_seq_len, settings.seed + i,
                                    desc=f'{domain} ({i + 1}/{len(docs)})')
        n_train, n_eval = split_counts(len(samples), settings, domain)
        (staging / domain).mkdir(exist_ok=True)
        write_mds_split(samples[:n_train], staging / domain / 'train')
        write_mds_split(samples[len(samples) - n_eval:], staging / domain / 'eval')
        manifest['domains'][domain] = {'documents': len(domain_docs), 'train_samples': n_train,
                                       'eval_samples': n_eval, 'tokens': int(samples.size),
                                       # what the shards are (sizes, hashes): the pre-flight checks them
                                       'splits': {split: describe_split(staging / domain / split) for split in SPLITS}}
        log.info('%s: %d documents -> %d train / %d eval samples', domain, len(domain_docs), n_train, n_eval)

    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (staging / BUILDING).unlink()
    # swap: OUT -> .OUT.old, staging -> OUT (a kill in between is finished by the next run), drop the old
    old_dir = _old_dir(out)
    shutil.rmtree(old_dir, ignore_errors=True)
    if out.exists():
        os.replace(out, old_dir)
    os.replace(staging, out)
    shutil.rmtree(old_dir, ignore_errors=True)
    return manifest
