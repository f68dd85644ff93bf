"""``drp-export CHECKPOINT OUT_DIR`` (or ``drp-export``): the command over ``drp_foundry.export``."""

from __future__ import annotations

import argparse
import sys

from drp_foundry.commands import write_folder_command
from drp_foundry.export import DTYPES, ExportError, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='drp-export', description='Export a pruning checkpoint (Composer) to a '
                                     'dense, smaller Hugging Face model: masks folded in, pruned structures sliced.')
    parser.add_argument('checkpoint', help='Composer checkpoint: a monolithic .pt file or a sharded checkpoint folder')
    parser.add_argument('out_dir', help='folder for the exported HF model (must not exist or be empty)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an earlier export in OUT_DIR (never a folder with checkpoints or the input)')
    parser.add_argument('--tokenizer', default=None, help='HF tokenizer folder (default: the one in the checkpoint)')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32', help='dtype of the saved weights')
    parser.add_argument('--source', default=None, help='the source model (path or hub name) for the model card; '
                        'the checkpoint does not record it')
    parser.add_argument('--eval-data', default=None, help='a data_prep output folder (its eval split) or .jsonl text: '
                        'compare the eval loss of the masked model as trained with the exported one')
    parser.add_argument('--eval-sequences', type=int, default=32, help='sequences of --eval-data to score')
    parser.add_argument('--eval-seq-len', type=int, default=128, help='tokens per --eval-data sequence')
    args = parser.parse_args(argv)
    return write_folder_command('drp-export', ExportError, lambda: export_checkpoint(
        args.checkpoint, args.out_dir, overwrite=args.overwrite, tokenizer_dir=args.tokenizer, dtype=args.dtype,
        source=args.source, eval_data=args.eval_data, eval_sequences=args.eval_sequences,
        eval_seq_len=args.eval_seq_len), args.out_dir)


if __name__ == '__main__':
    sys.exit(main())
