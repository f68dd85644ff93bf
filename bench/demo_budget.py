"""The demo's 12-minute budget on a CPU without bf16 instructions: distillation with fewer steps, or none with more?

    python bench/demo_budget.py --jobs 2          # four demo runs, two at a time, one thread each
    python bench/demo_budget.py --report-only     # the table from the finished runs

On an AVX2-only CPU the demo trains in fp32 and its 200 distilled continued steps alone take about 21
minutes. Two arms fit about 7 minutes of continued training on 2 cores (docs/RESULTS.md, "Demo budget",
fixed before the runs): ``distill`` (the source distilled in, alpha 0.5, 70 steps) and ``plain`` (no
teacher, 120 steps; a step costs about 0.6x). Each arm is the demo itself (``drp-demo --continue-steps N
--distill-alpha A --seed S``, everything else at its defaults) for seeds 17 and 18, paired. Scored: the
demo's own final table (continued model, mean and worst of the seven domains, nats/token on 16 x 128
held-out tokens per domain). Cost: the CPU seconds of each run (``os.wait4``: the demo and every stage it
waited for), the fair figure when two runs share the cores. Writes its section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = 'demo_budget'
ARMS = {'distill': {'continue_steps': 70, 'distill_alpha': 0.5}, 'plain': {'continue_steps': 120, 'distill_alpha': 0.0}}
SEEDS = (17, 18)

_spec = importlib.util.spec_from_file_location('scheduler_study', Path(__file__).resolve().with_name('scheduler_study.py'))
_study = sys.modules['scheduler_study'] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_study)
paired, write_results_section = _study.paired, _study.write_results_section


def run_demo(folder: Path, source: Path, seed: int, flags: list[str]) -> dict:
    """One ``drp-demo`` run into ``folder`` (skipped when its report exists): its report and its CPU seconds."""
    report_path, cost_path = folder / 'demo_drpruning.json', folder / 'cpu_seconds.json'
    if report_path.exists() and cost_path.exists():
        return {**json.loads(report_path.read_text()), **json.loads(cost_path.read_text())}
    cmd = [sys.executable, '-m', 'drp_foundry.commands.demo', '--work', str(folder), '--source', str(source),
           '--seed', str(seed), *flags]
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    started = time.time()
    with open(folder / 'demo.log', 'w') as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f'{folder.name} failed; log: {folder / "demo.log"}')
    cost = {'cpu_s': round(usage.ru_utime + usage.ru_stime, 1), 'bench_wall_s': round(time.time() - started, 1)}
    cost_path.write_text(json.dumps(cost))
    return {**json.loads(report_path.read_text()), **cost}


def arm_flags(arm: str) -> list[str]:
    settings = ARMS[arm]
    return ['--continue-steps', str(settings['continue_steps']), '--distill-alpha', str(settings['distill_alpha'])]


def run_arms(argv: list[str] | None, description: str, default_work: str, flags: dict[str, list[str]],
             seeds) -> tuple[dict[tuple[str, int], dict], Path]:
    """The command line of a demo study: every arm x seed (``--jobs`` at a time, finished runs reused), or
    with ``--report-only`` only the finished ones. Returns the runs' reports and the work folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--work', type=Path, default=Path(default_work))
    parser.add_argument('--source', type=Path, default=Path('models/smollm2-135m'))
    parser.add_argument('--jobs', type=int, default=1)
    parser.add_argument('--report-only', action='store_true')
    args = parser.parse_args(argv)
    work = args.work.resolve()
    keys = [(arm, seed) for seed in seeds for arm in flags]
    if args.report_only:
        missing = [k for k in keys if not (work / f'{k[0]}-{k[1]}' / 'cpu_seconds.json').exists()]
        if missing:
            raise SystemExit(f'not finished: {missing}; run without --report-only')
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = dict(zip(keys, pool.map(
            lambda k: run_demo(work / f'{k[0]}-{k[1]}', args.source.resolve(), k[1], flags[k[0]]), keys)))
    return done, work


def mean_worst(losses: dict[str, float]) -> tuple[float, float]:
    return sum(losses.values()) / len(losses), max(losses.values())


def paired_difference_lines(results: dict[tuple[str, int], dict], arm: str, baseline: str, seeds) -> list[str]:
    """``arm - baseline`` on the continued model's mean and worst domain loss, paired by seed, as report lines."""
    lines = []
    for metric, index in (('mean', 0), ('worst', 1)):
        ours = [mean_worst(results[(arm, s)]['losses']['continued'])[index] for s in seeds]
        theirs = [mean_worst(results[(baseline, s)]['losses']['continued'])[index] for s in seeds]
        d = paired(ours, theirs)
        lines.append(f'- {arm} - {baseline}, {metric}: {d["mean"]:+.3f} ± {d["se"]:.3f} (SE over {len(seeds)} paired '
                     f'seeds; 95% t interval [{d["lo"]:+.3f}, {d["hi"]:+.3f}]); per seed '
                     + ', '.join(f'{a - b:+.3f}' for a, b in zip(ours, theirs)))
    return lines


def mean_cpu_seconds(results: dict[tuple[str, int], dict], arms, seeds) -> dict[str, float]:
    return {arm: sum(results[(arm, s)]['cpu_s'] for s in seeds) / len(seeds) for arm in arms}


def report(results: dict[tuple[str, int], dict], command: str) -> str:
    lines = [f'Command: `{command}`', '',
             '| arm | continued steps | distillation alpha | seed | mean | worst | CPU (s) |', '|---|---:|---:|---:|---:|---:|---:|']
    for (arm, seed), r in sorted(results.items()):
        mean, worst = mean_worst(r['losses']['continued'])
        lines.append(f'| {arm} | {ARMS[arm]["continue_steps"]} | {ARMS[arm]["distill_alpha"]} | {seed} | {mean:.3f} | '
                     f'{worst:.3f} | {r["cpu_s"]:.0f} |')
    lines.append('')
    lines += paired_difference_lines(results, 'plain', 'distill', SEEDS)
    cpu = mean_cpu_seconds(results, ARMS, SEEDS)
    cost_ratio = cpu['plain'] / cpu['distill']
    lines.append(f'- CPU seconds per run, mean: distill {cpu["distill"]:.0f}, plain {cpu["plain"]:.0f} '
                 f'(plain / distill {cost_ratio:.2f}; premise: at most 1.15 -> '
                 f'{"met" if cost_ratio <= 1.15 else "NOT met: the arms are not at equal cost"})')
    lines.append('- **Reading** (fixed before the runs): ' + reading(results))
    return '\n'.join(lines)


def reading(results: dict[tuple[str, int], dict]) -> str:
    """The pre-registered rule: the lower mean over both seeds wins if both seeds agree in sign, else distill stays."""
    diffs = [mean_worst(results[('plain', s)]['losses']['continued'])[0]
             - mean_worst(results[('distill', s)]['losses']['continued'])[0] for s in SEEDS]
    if all(d < 0 for d in diffs):
        return f'both seeds favour `plain` on the mean: the demo trains without distillation, ' \
               f'{ARMS["plain"]["continue_steps"]} continued steps'
    if all(d > 0 for d in diffs):
        return f'both seeds favour `distill` on the mean: the demo keeps distillation, ' \
               f'{ARMS["distill"]["continue_steps"]} continued steps'
    return f'the seeds disagree: the data cannot separate the arms; distillation stays, ' \
           f'{ARMS["distill"]["continue_steps"]} continued steps'


def main(argv: list[str] | None = None) -> int:
    done, _ = run_arms(argv, __doc__.splitlines()[0], 'runs/demo_budget', {arm: arm_flags(arm) for arm in ARMS}, SEEDS)
    body = report(done, 'python bench/demo_budget.py --jobs 2')
    write_results_section(REPO / 'docs' / 'RESULTS.md', SECTION, '### Results (`bench/demo_budget.py`)\n\n' + body)
    print(body)
    return 0


if __name__ == '__main__':
    sys.exit(main())
