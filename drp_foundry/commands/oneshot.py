"""``drp-prune-oneshot MODEL OUT_DIR --target ... --calibration DATA`` (or ``drp-prune-oneshot``)."""

from __future__ import annotations

import argparse
import sys

from drp_foundry.commands import write_folder_command
from drp_foundry.oneshot import OneShotError, parse_target, prune_directory
from drp_foundry.oneshot import __doc__ as oneshot_doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='drp-prune-oneshot', description=oneshot_doc.split('\n\n')[0])
    parser.add_argument('model', help='HF directory of the source model')
    parser.add_argument('out_dir', help='folder for the pruned HF model')
    parser.add_argument('--target', required=True, help='layers=N,hidden=N,heads=N,kv_heads=N,intermediate=N')
    parser.add_argument('--calibration', required=True, help='data_prep output folder, or .jsonl text (file/folder)')
    parser.add_argument('--num-sequences', type=int, default=64, help='calibration sequences (default 64)')
    parser.add_argument('--seq-len', type=int, default=128, help='tokens per calibration sequence (default 128)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--split', default='train', help='MDS split to calibrate on (default train)')
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty OUT_DIR')
    args = parser.parse_args(argv)

    def write():
        if args.num_sequences < 1 or args.seq_len < 2:
            raise OneShotError('--num-sequences must be >= 1 and --seq-len >= 2')
        return prune_directory(args.model, args.out_dir, parse_target(args.target), args.calibration,
                               args.num_sequences, args.seq_len, args.batch_size, args.split, args.overwrite)

    return write_folder_command('drp-prune-oneshot', OneShotError, write, args.out_dir)


if __name__ == '__main__':
    sys.exit(main())
