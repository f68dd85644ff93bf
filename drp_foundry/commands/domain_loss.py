"""``drp-domain-loss MODEL_DIR DATA_ROOT --max-seq-len N``: per-domain eval loss table of a HF model folder.

(``python -m drp_foundry.commands.domain_loss`` is the same.) The loss is LLM-Foundry's
``LanguageCrossEntropy`` (nats per predicted token) through the training path
(``composer/domain_eval_losses.evaluate_domains``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from drp_foundry.eval.domain_loss import DomainLossError, check_inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description='Per-domain eval loss of a HF model directory.')
    parser.add_argument('model_dir')
    parser.add_argument('data_root', help='data_prep output (DATA_ROOT/<domain>/<split>/)')
    parser.add_argument('--split', default='eval')
    parser.add_argument('--domains', nargs='+')
    parser.add_argument('--max-seq-len', type=int, required=True)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--max-batches', type=int, default=None, help='cap per domain')
    parser.add_argument('--json', help='also write the losses to this file')
    args = parser.parse_args(argv)
    try:
        check_inputs(args.model_dir, args.data_root, args.domains, args.split, args.max_seq_len)
    except DomainLossError as err:
        print(f'domain_loss: error: {err}', file=sys.stderr)
        return 2
    from drp_foundry.composer.domain_eval_losses import evaluate_domains

    losses = evaluate_domains(args.model_dir, args.data_root, args.domains, max_seq_len=args.max_seq_len,
                              split=args.split, batch_size=args.batch_size, max_batches=args.max_batches)
    for domain, loss in losses.items():
        print(f'{domain:>14}  {loss:.4f}')
    if args.json:
        Path(args.json).write_text(json.dumps(losses, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
