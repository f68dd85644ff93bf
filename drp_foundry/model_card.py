"""The model card (``README.md``) of an exported model folder.

``drp-export`` writes it beside the weights: the source model, the pruned
architecture against the source's, parameter counts, what the pruning run learned and for
how long (batches, samples, tokens), the data scheduler's policy and final mixture, and the
per-domain eval loss when it is known, and whether the exported model is the one the run trained
(``fidelity``: expected size vs target, kept-layer counts, undecided mask entries, masked vs
exported eval loss; ``drp_foundry/pruning/fidelity.py``). The facts are kept in ``model_card.json`` too, so a
later step that measures the per-domain losses (the demo does) adds its table with
``add_domain_losses`` and the card is written again from the same facts.

The facts come from the Composer checkpoint: the HF config Composer stores (the source's
``_name_or_path``), the timestamp, the run name, and the states of the ``drp_dynamic_loading``
callback (policy, domains, reference ratio, final mixture q, number of updates).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CARD_FILENAME = 'README.md'
FACTS_FILENAME = 'model_card.json'
SCHEDULER_CALLBACK = 'DynamicLoading'  # the class name Composer keys its checkpoint state by

_SIZE_ROWS = (('num_hidden_layers', 'layers'), ('hidden_size', 'hidden size'),
              ('num_attention_heads', 'attention heads'), ('num_key_value_heads', 'KV heads'),
              ('intermediate_size', 'FFN size'))


def _timestamp(state: dict[str, Any]) -> dict[str, int]:
    stamp = (state.get('timestamp') or {}).get('Timestamp') or {}
    return {unit: int(stamp[unit]) for unit in ('batch', 'sample', 'token') if stamp.get(unit) is not None}


def _scheduler(state: dict[str, Any]) -> dict[str, Any] | None:
    policy_state = ((state.get('callbacks') or {}).get(SCHEDULER_CALLBACK) or {}).get('policy_state')
    if not isinstance(policy_state, dict) or 'policy' not in policy_state:
        return None
    keys = ('policy', 'domain_names', 'p_ref_initial', 'p_ref', 'q', 'num_updates', 'last_update_step')
    return {key: policy_state[key] for key in keys if key in policy_state}


def card_facts(checkpoint: dict[str, Any], checkpoint_path: str | os.PathLike, report: dict[str, Any],
               target: dict[str, Any], granularities: list[str], dtype: str,
               source: str | None = None) -> dict[str, Any]:
    """Everything the card says, as plain JSON values, from a Composer checkpoint and the export's report.

    ``source`` names the source model (a path or hub name): Composer's checkpoint keeps the source's
    config but not where it came from, so without it the card says the source was not recorded.
    """
    state = checkpoint.get('state') or {}
    hf_config = ((((state.get('integrations') or {}).get('huggingface') or {}).get('model') or {})
                 .get('config') or {}).get('content') or {}
    return {
        'source': source or hf_config.get('_name_or_path') or None,
        'model_type': report.get('model_type', hf_config.get('model_type', 'unknown')),
        'checkpoint': str(checkpoint_path),
        'run_name': state.get('run_name'),
        'trained': _timestamp(state),
        'dtype': dtype,
        'source_sizes': report['source_sizes'],
        'pruned_sizes': report['pruned_sizes'],
        'params_before': int(report['params_before']),
        'params_after': int(report['params_after']),
        'kept_layers': [layer['source_index'] for layer in report.get('kept_layers', [])],
        'target': dict(target),
        'granularities': list(granularities),
        'algorithms': sorted(name for name, _ in state.get('algorithms') or [] if isinstance(name, str)),
        'scheduler': _scheduler(state),
        'domain_losses': None,
        'fidelity': report.get('fidelity'),
    }


def _fmt_count(n: int) -> str:
    """``1,234,567 (1.2M)``; small counts without the short form."""
    short = f'{n / 1e9:.2f}B' if n >= 1e9 else f'{n / 1e6:.1f}M' if n >= 1e6 else ''
    return f'{n:,} ({short})' if short else f'{n:,}'


def _mixture_table(scheduler: dict[str, Any]) -> list[str]:
    domains = scheduler.get('domain_names') or []
    columns = [(key, label) for key, label in (('p_ref_initial', 'initial reference ratio p_R⁰'),
                                                ('p_ref', 'final p_R'), ('q', 'final mixture q'))
               if len(scheduler.get(key) or []) == len(domains)]
    if not domains or not columns:
        return []
    lines = ['| domain | ' + ' | '.join(label for _, label in columns) + ' |',
             '|---|' + '---:|' * len(columns)]
    for i, domain in enumerate(domains):
        lines.append(f'| {domain} | ' + ' | '.join(f'{scheduler[key][i]:.3f}' for key, _ in columns) + ' |')
    return lines


def _loss_table(domain_losses: dict[str, Any]) -> list[str]:
    columns: dict[str, dict[str, float]] = domain_losses['columns']
    names = list(columns)
    domains = list(next(iter(columns.values())))
    lines = ['| domain | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
    for domain in domains:
        lines.append(f'| {domain} | ' + ' | '.join(f'{columns[n][domain]:.3f}' if domain in columns[n] else '–'
                                                   for n in names) + ' |')
    for label, reduce in (('mean', lambda v: sum(v) / len(v)), ('worst', max)):
        lines.append(f'| **{label}** | ' + ' | '.join(f'{reduce(list(columns[n].values())):.3f}' for n in names)
                     + ' |')
    return lines


def _fidelity_lines(fidelity: dict[str, Any] | None) -> list[str]:
    """The card's "Is this the trained model?" section (absent for a one-shot export: no training)."""
    if not fidelity:
        return []
    lines = ['', '## Is this the model the run trained?', '',
             f'- expected size under the learned masks: {fidelity["expected_num_parameters"]:,.0f} parameters, against '
             f'{fidelity["target_num_parameters"]:,} exported ({fidelity["relative_size_gap"]:+.2%})',
             '- expected kept counts of the kept layers (target): ' + '; '.join(
                 f'{key} {row["expected"]} ({row["target"]})' for key, row in fidelity['kept_rows'].items()),
             f'- undecided mask entries (a training gate disagrees with the exported value over 5% of the time): '
             f'{fidelity["undecided_share"]["total"]:.1%}; temperature {fidelity["temperature"]:.3f}'
             + ('; the last steps trained the exported masks (hardened)' if fidelity.get('hardened') else '')]
    if fidelity.get('masked_loss') is not None:
        lines.append(f'- eval loss: masked model as trained {fidelity["masked_loss"]:.4f}, exported '
                     f'{fidelity["exported_loss"]:.4f}')
    warnings = fidelity.get('warnings') or []
    lines.append('- **warning**: ' + '; '.join(warnings) if warnings else
                 '- within tolerance: the exported model is the trained one')
    return lines


def render_model_card(facts: dict[str, Any], name: str = 'model') -> str:
    """The card's Markdown (with the Hugging Face metadata block at the top)."""
    before, after = facts['params_before'], facts['params_after']
    trained = facts.get('trained') or {}
    lines = ['---', 'library_name: transformers', 'tags:', '- drp-foundry', '- pruned', '- drpruning',
             'pipeline_tag: text-generation', '---', '',
             f'# {name}', '',
             f'A structured-pruned {facts["model_type"]} model, exported by '
             'drp-foundry (DRPruning: L0 hard-concrete masks under a Lagrangian size '
             'constraint, with a distributionally robust data scheduler). The masks were folded into the '
             'weights and the pruned structures sliced off, so this is a dense model that loads with plain '
             '`transformers`.', '',
             '## Source', '',
             (f'- source model: `{facts["source"]}`' if facts.get('source') else
              '- source model: not recorded in the checkpoint (`drp-export --source NAME` names it)')
             + f' ({facts["model_type"]}, {before:,} parameters)',
             f'- pruning checkpoint: `{facts["checkpoint"]}`' + (f' (run `{facts["run_name"]}`)'
                                                                   if facts.get('run_name') else ''),
             f'- weights saved as {facts["dtype"]}', '',
             '## Architecture', '',
             '| | source | pruned |', '|---|---:|---:|']
    for key, label in _SIZE_ROWS:
        if key in facts['pruned_sizes']:
            lines.append(f'| {label} | {facts["source_sizes"].get(key, "?")} | {facts["pruned_sizes"][key]} |')
    lines += [f'| parameters | {_fmt_count(before)} | {_fmt_count(after)}; {after / before:.1%} of the source |',
              '',
              '## Pruning', '',
              f'- target: `{json.dumps(facts["target"], sort_keys=True)}`; masks learned: '
              f'{", ".join(facts["granularities"])}',
              f'- kept layers (source indices): {facts["kept_layers"]}']
    if trained:
        parts = [f'{trained["batch"]:,} steps' if 'batch' in trained else None,
                 f'{trained["sample"]:,} samples' if 'sample' in trained else None,
                 f'{trained["token"]:,} tokens seen' if 'token' in trained else None]
        lines.append('- pruning run: ' + ', '.join(p for p in parts if p))
    if facts.get('algorithms'):
        lines.append(f'- Composer algorithms in the run: {", ".join(facts["algorithms"])}')
    lines += _fidelity_lines(facts.get('fidelity'))
    lines += ['', '## Data scheduler', '']
    scheduler = facts.get('scheduler')
    if scheduler:
        lines.append(f'- policy `{scheduler["policy"]}` (`drp_dynamic_loading`), '
                     f'{scheduler.get("num_updates", 0)} mixture updates'
                     + (f', the last at step {scheduler["last_update_step"]}'
                        if scheduler.get('last_update_step') is not None else ''))
        lines += [''] + _mixture_table(scheduler)
    else:
        lines.append('The pruning run had no `drp_dynamic_loading` callback (fixed mixture).')
    lines += ['', '## Per-domain eval loss', '']
    domain_losses = facts.get('domain_losses')
    if domain_losses and domain_losses.get('columns'):
        if domain_losses.get('note'):
            lines += [domain_losses['note'], '']
        lines += _loss_table(domain_losses)
    else:
        lines.append('Not measured at export. Measure it on your per-domain MDS data with '
                     '`drp-domain-loss MODEL_DIR DATA_ROOT --max-seq-len N`.')
    lines += ['', '## Use', '', '```python', 'from transformers import AutoModelForCausalLM, AutoTokenizer',
              'model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)',
              'tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)', '```', '',
              'A pruned model is usually trained further before use (continued pretraining: '
              '`yamls/continue_*.yaml` with `variables.model_dir=MODEL_DIR`). `pruning_report.json` lists '
              'what was kept in every layer; `model_card.json` holds the facts of this card.', '',
              '## License', '',
              'The weights derive from the source model and keep its license; the training data keep theirs.',
              '']
    return '\n'.join(lines)


def write_model_card(model_dir: str | os.PathLike, facts: dict[str, Any], name: str | None = None) -> Path:
    """Write ``README.md`` and ``model_card.json`` into ``model_dir``; returns the card's path. ``name``
    (the card's title) defaults to the folder's name."""
    model_dir = Path(model_dir)
    (model_dir / FACTS_FILENAME).write_text(json.dumps(facts, indent=2) + '\n')
    card = model_dir / CARD_FILENAME
    card.write_text(render_model_card(facts, name=name or model_dir.name))
    return card


def add_domain_losses(model_dir: str | os.PathLike, columns: dict[str, dict[str, float]], note: str = '') -> Path:
    """Add (or replace) the per-domain eval-loss table, one column per model (e.g. source / pruned /
    continued), and write the card again."""
    model_dir = Path(model_dir)
    facts_path = model_dir / FACTS_FILENAME
    if not facts_path.is_file():
        raise FileNotFoundError(f'{facts_path} not found: {model_dir} was not written by drp_foundry.export')
    if not columns or not all(isinstance(c, dict) and c for c in columns.values()):
        raise ValueError('columns: give {model name: {domain: loss}} with at least one domain')
    facts = json.loads(facts_path.read_text())
    facts['domain_losses'] = {'note': note, 'columns': {name: {d: float(v) for d, v in losses.items()}
                                                        for name, losses in columns.items()}}
    return write_model_card(model_dir, facts)
