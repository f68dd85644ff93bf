"""The demo's default path at its budget: one-shot pruning, or the paper's learned masks at equal cost?

    python bench/demo_path.py --jobs 2          # six demo runs, two at a time, one thread each
    python bench/demo_path.py --report-only     # the table from the finished runs

Fixed before the runs in docs/RESULTS.md ("Demo path"). Arms, each the demo itself with everything else at
its defaults: ``oneshot`` (``--path oneshot``, 120 continued steps, the demo's default) and ``l0``
(``--path l0``: 20 pruning steps of learned masks from importance init with the projection, export, then
40 continued steps, so that both arms cost about the same CPU time). Seeds 17, 18, 19, paired. Scored: the
demo's own final table (continued model, mean and worst of the seven domains). Premises: the arms' CPU
seconds within 0.87-1.15x of each other; every l0 run ends exactly on target (worst row 0.00 entries off,
0.0% undecided) with the masked model's eval loss equal to the export's. Writes its section of
docs/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = 'demo_path'
ARMS = {'oneshot': ['--path', 'oneshot', '--continue-steps', '120'],
        'l0': ['--path', 'l0', '--continue-steps', '40']}
SEEDS = (17, 18, 19)
COST_BAND = (0.87, 1.15)

_spec = importlib.util.spec_from_file_location('demo_budget', Path(__file__).resolve().with_name('demo_budget.py'))
_budget = sys.modules['demo_budget'] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_budget)
run_arms, mean_worst, write_results_section = _budget.run_arms, _budget.mean_worst, _budget.write_results_section
paired_difference_lines, mean_cpu_seconds = _budget.paired_difference_lines, _budget.mean_cpu_seconds

def l0_on_target(pruning_report: Path) -> dict:
    """What the export of an l0 run says about its masks (``pruning_report.json``'s ``fidelity``), and whether
    that is exactly on target: every row 0.00 entries off, 0.0% undecided, masked = exported to 4 decimals."""
    if not pruning_report.exists():
        return {'found': False, 'on_target': False}
    fidelity = json.loads(pruning_report.read_text()).get('fidelity') or {}
    if fidelity.get('masked_loss') is None:
        return {'found': False, 'on_target': False}
    checked = {'found': True, 'expected': round(fidelity['expected_num_parameters']),
               'target': fidelity['target_num_parameters'], 'worst_row': fidelity['worst_row_gap'],
               'undecided_pct': 100 * fidelity['undecided_share']['total'], 'masked': fidelity['masked_loss'],
               'exported': fidelity['exported_loss']}
    checked['on_target'] = (checked['worst_row'] < 0.005 and checked['undecided_pct'] < 0.05
                            and f'{checked["masked"]:.4f}' == f'{checked["exported"]:.4f}')
    return checked


def report(results: dict[tuple[str, int], dict], checks: dict[int, dict], command: str) -> str:
    lines = [f'Command: `{command}`', '',
             '| arm | seed | mean | worst | CPU (s) |', '|---|---:|---:|---:|---:|']
    for (arm, seed), r in sorted(results.items()):
        mean, worst = mean_worst(r['losses']['continued'])
        lines.append(f'| {arm} | {seed} | {mean:.3f} | {worst:.3f} | {r["cpu_s"]:.0f} |')
    lines.append('')
    lines += paired_difference_lines(results, 'l0', 'oneshot', SEEDS)
    cpu = mean_cpu_seconds(results, ARMS, SEEDS)
    ratio = cpu['l0'] / cpu['oneshot']
    cost_met = COST_BAND[0] <= ratio <= COST_BAND[1]
    lines.append(f'- CPU seconds per run, mean: oneshot {cpu["oneshot"]:.0f}, l0 {cpu["l0"]:.0f} (l0 / oneshot '
                 f'{ratio:.2f}; premise {COST_BAND[0]}-{COST_BAND[1]} -> {"met" if cost_met else "NOT met"})')
    for seed in SEEDS:
        c = checks[seed]
        lines.append(f'- l0 seed {seed} at export: ' + (
            f'expected {c["expected"]:,} vs target {c["target"]:,}, worst row {c["worst_row"]:.2f} entries off, '
            f'{c["undecided_pct"]:.1f}% undecided; eval loss masked {c["masked"]:.4f}, exported {c["exported"]:.4f} '
            f'-> {"on target" if c["on_target"] else "NOT on target"}' if c['found'] else 'no export report with the masked and exported losses found'))
    on_target = all(checks[s]['on_target'] for s in SEEDS)
    lines.append('- **Reading** (fixed before the runs): ' + reading(results, cost_met, on_target))
    return '\n'.join(lines)


def reading(results: dict[tuple[str, int], dict], cost_met: bool, on_target: bool) -> str:
    """The pre-registered rule: l0 becomes the default only if every seed favours it on the mean and both premises hold."""
    if not cost_met or not on_target:
        return 'a premise failed (above): no verdict; the demo keeps `--path oneshot`'
    diffs = [mean_worst(results[('l0', s)]['losses']['continued'])[0]
             - mean_worst(results[('oneshot', s)]['losses']['continued'])[0] for s in SEEDS]
    if all(d < 0 for d in diffs):
        return 'every seed favours `l0` on the mean at equal cost: the demo\'s default becomes `--path l0` ' \
               f'({ARMS["l0"][-1]} continued steps)'
    if all(d > 0 for d in diffs):
        return 'every seed favours `oneshot` on the mean at equal cost: the demo keeps `--path oneshot`'
    return 'the seeds disagree: the data cannot separate the paths at this budget; the demo keeps `--path oneshot`'


def main(argv: list[str] | None = None) -> int:
    done, work = run_arms(argv, __doc__.splitlines()[0], 'runs/demo_path', ARMS, SEEDS)
    checks = {seed: l0_on_target(work / f'l0-{seed}' / 'models' / 'pruned-l0-drpruning' / 'pruning_report.json')
              for seed in SEEDS}
    body = report(done, checks, 'python bench/demo_path.py --jobs 2')
    write_results_section(REPO / 'docs' / 'RESULTS.md', SECTION, '### Results (`bench/demo_path.py`)\n\n' + body)
    print(body)
    return 0


if __name__ == '__main__':
    sys.exit(main())
