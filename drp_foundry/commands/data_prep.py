"""The commands over ``data_prep``, and the only module of ``drp_foundry`` that imports it.

- ``drp-prepare-data --corpus DIR --out DATA_ROOT ...`` (or ``python -m drp_foundry.commands.data_prep``):
  per-domain JSONL -> per-domain MDS shards (``data_prep.build_domain_mds``); ``--list`` only names the
  domains it finds.
- ``drp-hf-corpora slimpajama|culturax --out DIR ...``: a corpus through `datasets` -> per-domain JSONL
  (``data_prep.hf_corpora``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_prep.build_domain_mds import DataPrepError, PrepSettings, build_domain_mds, find_domain_files
from data_prep.build_domain_mds import __doc__ as build_doc
from data_prep.hf_corpora import (
    CULTURAX,
    CULTURAX_LANGUAGES,
    DEFAULT_DOCS_PER_FILE,
    SLIMPAJAMA,
    SLIMPAJAMA_DOMAINS,
    CorpusExportError,
    _expand_caps,
    _parse_caps,
    export_culturax,
    export_slimpajama,
)
from data_prep.hf_corpora import __doc__ as corpora_doc


def prepare_data_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=build_doc.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--corpus', required=True, help='folder of <domain>.jsonl files or <domain>/ folders')
    parser.add_argument('--out', help='output folder (DATA_ROOT); required unless --list')
    parser.add_argument('--list', action='store_true', help='name the domains found in --corpus and exit (writes nothing)')
    parser.add_argument('--domains', nargs='+', help='domains to take (default: all in --corpus)')
    parser.add_argument('--tokenizer', help='local Hugging Face tokenizer folder')
    parser.add_argument('--train-tokenizer', type=int, metavar='VOCAB_SIZE',
                        help='train a byte-level BPE of this size on the corpus instead (tiny runs)')
    parser.add_argument('--max-seq-len', type=int, default=PrepSettings.max_seq_len)
    parser.add_argument('--seed', type=int, default=PrepSettings.seed)
    parser.add_argument('--eval-fraction', type=float, default=PrepSettings.eval_fraction)
    parser.add_argument('--min-eval-samples', type=int, default=PrepSettings.min_eval_samples)
    parser.add_argument('--max-eval-samples', type=int, default=PrepSettings.max_eval_samples)
    parser.add_argument('--max-train-samples', type=int, default=None, help='cap per domain (demo runs)')
    parser.add_argument('--overwrite', action='store_true',
                        help='rebuild a data root built from other inputs (the whole root, all or nothing)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if args.list:
        try:
            files = find_domain_files(Path(args.corpus), args.domains)
        except DataPrepError as err:
            print(f'data_prep: error: {err}', file=sys.stderr)
            return 2
        print(f'{len(files)} domains: {", ".join(sorted(files))}')
        return 0
    if not args.out:
        parser.error('--out is required (or --list)')
    settings = PrepSettings(max_seq_len=args.max_seq_len, seed=args.seed, eval_fraction=args.eval_fraction,
                            min_eval_samples=args.min_eval_samples, max_eval_samples=args.max_eval_samples,
                            max_train_samples=args.max_train_samples)
    try:
        manifest = build_domain_mds(args.corpus, args.out, domains=args.domains, tokenizer=args.tokenizer,
                                    train_tokenizer_vocab=args.train_tokenizer, settings=settings,
                                    overwrite=args.overwrite)
    except DataPrepError as err:
        print(f'data_prep: error: {err}', file=sys.stderr)
        return 2
    for domain, info in manifest['domains'].items():
        print(f'{domain:>14}: {info["train_samples"]:6d} train / {info["eval_samples"]:4d} eval samples')
    return 0


def hf_corpora_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=corpora_doc.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='corpus', required=True)
    for name, help_text in (('slimpajama', 'SlimPajama -> the seven RedPajama domains'),
                            ('culturax', 'CulturaX -> one domain per language')):
        p = sub.add_parser(name, help=help_text)
        p.add_argument('--out', required=True, help='corpus folder for build_domain_mds --corpus')
        p.add_argument('--dataset', default=SLIMPAJAMA if name == 'slimpajama' else CULTURAX,
                       help="hub name, or 'json' with --data-files for a local copy")
        p.add_argument('--data-files', default=None,
                       help='local files (glob); for culturax a pattern containing {language}')
        p.add_argument('--split', default='train')
        if name == 'slimpajama':
            p.add_argument('--domains', nargs='+', default=None, help=f'default: {list(SLIMPAJAMA_DOMAINS.values())}')
        else:
            p.add_argument('--languages', nargs='+', default=list(CULTURAX_LANGUAGES))
        p.add_argument('--max-documents', nargs='+', metavar='N|DOMAIN=N', help='cap for every domain and/or per domain')
        p.add_argument('--max-characters', nargs='+', metavar='N|DOMAIN=N', help='same, in characters')
        p.add_argument('--shuffle-buffer', type=int, default=0, help='0: keep stream order')
        p.add_argument('--seed', type=int, default=17)
        p.add_argument('--docs-per-file', type=int, default=DEFAULT_DOCS_PER_FILE)
        p.add_argument('--overwrite', action='store_true', help='replace domains already in --out')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        domains = (args.domains or list(SLIMPAJAMA_DOMAINS.values())) if args.corpus == 'slimpajama' else \
            args.languages
        common = dict(dataset=args.dataset, data_files=args.data_files, split=args.split,
                      max_documents=_expand_caps(_parse_caps(args.max_documents, '--max-documents'), domains),
                      max_characters=_expand_caps(_parse_caps(args.max_characters, '--max-characters'), domains),
                      shuffle_buffer=args.shuffle_buffer, seed=args.seed, docs_per_file=args.docs_per_file,
                      overwrite=args.overwrite)
        if args.corpus == 'slimpajama':
            manifest = export_slimpajama(args.out, domains=domains, **common)
        else:
            manifest = export_culturax(args.out, languages=domains, **common)
    except CorpusExportError as err:
        print(f'hf_corpora: error: {err}', file=sys.stderr)
        return 2
    for domain, info in manifest['domains'].items():
        print(f'{domain:>14}: {info["documents"]:9d} documents {info["characters"]:14d} characters'
              f'{"" if info["reached_cap"] else "  (source exhausted before the cap)"}')
    return 0



if __name__ == '__main__':
    sys.exit(prepare_data_main())
