"""``drp-loop-rate MODEL_DIR DATA_ROOT``: share of held-out prefixes whose greedy continuation loops.

(``python -m drp_foundry.commands.loop_rate`` is the same.) See ``drp_foundry/eval/loop_rate.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='Share of held-out prefixes whose greedy continuation loops.')
    parser.add_argument('model_dir', nargs='+', help='one or more HF model folders')
    parser.add_argument('data_root', help='data_prep output (DATA_ROOT/<domain>/<split>/)')
    parser.add_argument('--split', default='eval')
    parser.add_argument('--prefix-tokens', type=int, default=16)
    parser.add_argument('--per-domain', type=int, default=16)
    parser.add_argument('--new-tokens', type=int, default=24)
    parser.add_argument('--show', type=int, default=0, help='print this many flagged continuations per model')
    parser.add_argument('--json', help='also write {model_dir: summary} to this file')
    args = parser.parse_args(argv)
    problems = [f'MODEL_DIR {d} has no config.json; pass a Hugging Face model folder'
                for d in args.model_dir if not (Path(d) / 'config.json').is_file()]
    if not Path(args.data_root).is_dir():
        problems.append(f'DATA_ROOT {args.data_root} does not exist; pass the --out folder of data_prep')
    if problems:  # checked before any model is loaded
        print(f'loop_rate: error: {problems[0]}', file=sys.stderr)
        return 2
    from drp_foundry.eval.loop_rate import heldout_prefixes, loop_rate_of_directory

    prefixes = heldout_prefixes(args.data_root, args.prefix_tokens, args.per_domain, args.split)
    summaries = {}
    for model_dir in args.model_dir:
        result, tokenizer = loop_rate_of_directory(model_dir, prefixes, args.new_tokens)
        summaries[model_dir] = result.summary()
        per_domain = ', '.join(f'{d} {k}/{n}' for d, (k, n) in result.counts.items())
        print(f'{model_dir}: {result.overall:.3f} loop ({per_domain})')
        shown = [(d, ids) for d, rows in result.loops.items() for ids in rows][:args.show]
        for domain, ids in shown:
            print(f'  [{domain}] {tokenizer.decode(ids)!r}')
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
