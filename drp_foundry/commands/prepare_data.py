"""``drp-prepare-data --corpus DIR --out DATA_ROOT ...`` (or ``python -m data_prep.build_domain_mds``): per-domain
JSONL -> per-domain MDS shards, the command over ``data_prep.build_domain_mds``."""

from __future__ import annotations

import argparse
import logging
import sys

from data_prep.build_domain_mds import DataPrepError, PrepSettings, build_domain_mds
from data_prep.build_domain_mds import __doc__ as build_doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=build_doc.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--corpus', required=True, help='folder of <domain>.jsonl files or <domain>/ folders')
    parser.add_argument('--out', required=True, help='output folder (DATA_ROOT)')
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


if __name__ == '__main__':
    sys.exit(main())
