"""Per-domain eval loss of a Hugging Face model directory on per-domain MDS eval splits.

The measurement goes through the same path as training: LLM-Foundry's ``hf_causal_lm``
model, its ``text`` eval loaders (one per domain, labelled with the domain) and a Composer
``Trainer.eval``; the loss is LLM-Foundry's ``LanguageCrossEntropy`` (nats per predicted
token). ``python -m drp_foundry.eval.domain_loss MODEL_DIR DATA_ROOT`` prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from drp_foundry.composer.domain_eval_losses import read_domain_eval_losses
from drp_foundry.composer.multidomain_dataloader import domain_eval_loader_configs


def domains_in(data_root: str | Path, split: str = 'eval') -> list[str]:
    """Domains that have ``DATA_ROOT/<domain>/<split>/index.json``, sorted."""
    root = Path(data_root)
    found = sorted(p.parent.parent.name for p in root.glob(f'*/{split}/index.json'))
    if not found:
        raise FileNotFoundError(f'no <domain>/{split}/index.json under {root}; build it with data_prep')
    return found


def evaluate_domains(model_dir: str | Path, data_root: str | Path, domains: Sequence[str] | None = None, *,
                     max_seq_len: int, split: str = 'eval', batch_size: int = 4,
                     max_batches: int | None = None) -> dict[str, float]:
    """Per-domain eval loss of ``model_dir``; ``max_batches`` caps the batches per domain.

    Tokens per domain = (number of eval samples, capped at ``max_batches * batch_size``) x
    ``max_seq_len``.
    """
    from composer import Trainer
    from composer.core import Evaluator
    from llmfoundry.data.dataloader import build_dataloader
    from llmfoundry.utils.builders import build_composer_model, build_tokenizer

    domains = list(domains) if domains is not None else domains_in(data_root, split)
    tokenizer = build_tokenizer(str(model_dir), {'model_max_length': max_seq_len})
    model = build_composer_model(name='hf_causal_lm', tokenizer=tokenizer,
                                 cfg={'pretrained_model_name_or_path': str(model_dir), 'pretrained': True,
                                      'trust_remote_code': False, 'use_auth_token': False})
    evaluators = []
    for cfg in domain_eval_loader_configs(str(data_root), domains, max_seq_len, split=split):
        label = cfg.pop('label')
        spec = build_dataloader(cfg, tokenizer, batch_size)
        evaluators.append(Evaluator(label=f'eval/{label}', dataloader=spec, metric_names=['LanguageCrossEntropy'],
                                    subset_num_batches=max_batches or -1))
    trainer = Trainer(model=model, eval_dataloader=evaluators, device='cpu' if not _cuda() else 'gpu',
                      progress_bar=False, log_to_console=False, loggers=[])
    trainer.eval()
    losses = read_domain_eval_losses(trainer.state, domains)
    trainer.close()
    return losses


class DomainLossError(ValueError):
    """Bad input to the per-domain eval; the message names the folder, domain or option."""


def check_inputs(model_dir: str | Path, data_root: str | Path, domains: Sequence[str] | None, split: str,
                 max_seq_len: int) -> list[str]:
    """Refuse a missing model folder, data root or domain, and a sequence length the data was not built with.

    Runs before any model is loaded; returns the domains to evaluate.
    """
    model_dir, data_root = Path(model_dir), Path(data_root)
    if not (model_dir / 'config.json').is_file():
        what = 'does not exist' if not model_dir.exists() else 'has no config.json'
        raise DomainLossError(f'MODEL_DIR {model_dir} {what}; pass a Hugging Face model folder (the output of '
                              '`python -m drp_foundry.export`, or a save_pretrained folder). Nothing is downloaded')
    if not data_root.is_dir():
        raise DomainLossError(f'DATA_ROOT {data_root} does not exist; pass the --out folder of data_prep')
    try:
        available = domains_in(data_root, split)
    except FileNotFoundError as err:
        raise DomainLossError(str(err)) from None
    chosen = list(domains) if domains else available
    missing = [d for d in chosen if d not in available]
    if missing:
        raise DomainLossError(f'--domains {missing}: no {split} split under {data_root} (present: {available})')
    manifest_path = data_root / 'manifest.json'
    if manifest_path.is_file():
        built = (json.loads(manifest_path.read_text()).get('settings') or {}).get('max_seq_len')
        if built is not None and int(built) != int(max_seq_len):
            raise DomainLossError(f'--max-seq-len {max_seq_len}, but {data_root} was built with max_seq_len {built} '
                                  f'(manifest.json); pass --max-seq-len {built}')
    return chosen


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
    losses = evaluate_domains(args.model_dir, args.data_root, args.domains, max_seq_len=args.max_seq_len,
                              split=args.split, batch_size=args.batch_size, max_batches=args.max_batches)
    for domain, loss in losses.items():
        print(f'{domain:>14}  {loss:.4f}')
    if args.json:
        Path(args.json).write_text(json.dumps(losses, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
