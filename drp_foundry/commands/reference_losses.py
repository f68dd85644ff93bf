"""``drp-reference-losses pilot METRICS.jsonl`` / ``drp-reference-losses fit SIZES.json --target-size N``:
target-size reference losses for the ``drp_dynamic_loading`` policies (``drp_foundry/scheduling/reference_losses.py``)."""

from __future__ import annotations

import argparse
import json
import sys

from drp_foundry.scheduling.reference_losses import (
    losses_from_metrics_jsonl,
    pilot_reference_losses,
    size_law_reference_losses,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='Target-size reference losses for drp_dynamic_loading policies.')
    sub = parser.add_subparsers(dest='mode', required=True)
    pilot = sub.add_parser('pilot', help='mean per-domain eval loss of the last evaluations of a pilot run')
    pilot.add_argument('metrics', help='the pilot\'s metrics.jsonl (drp_jsonl logger)')
    pilot.add_argument('--last', type=int, default=3)
    fit = sub.add_parser('fit', help='per-domain l(N) fit over source sizes')
    fit.add_argument('losses', help='JSON file {"sizes": [...], "losses": {domain: [...]}}')
    fit.add_argument('--target-size', type=float, required=True)
    args = parser.parse_args(argv)
    if args.mode == 'pilot':
        refs = pilot_reference_losses(losses_from_metrics_jsonl(args.metrics), last=args.last)
    else:
        spec = json.loads(open(args.losses, encoding='utf-8').read())
        refs = size_law_reference_losses(spec['sizes'], spec['losses'], args.target_size)
    print(json.dumps({d: round(v, 4) for d, v in refs.items()}))
    return 0



if __name__ == '__main__':
    sys.exit(main())
