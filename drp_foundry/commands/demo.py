"""``drp-demo`` (``python -m drp_foundry.commands.demo``): the CPU demo's command line; the stages are
``drp_foundry/demo/pipeline.py``."""

from __future__ import annotations

import argparse
import sys

from drp_foundry.demo import pipeline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=pipeline.__doc__.split('\n\n')[0],
                                     epilog='docs/DEMO.md describes every stage and option.')
    parser.add_argument('--corpus', default=None,
                        help='folder of <domain>.jsonl[.zst|.gz] files (text field); default: the embedded '
                             'seven-domain RedPajama sample (drp_foundry/demo/corpus)')
    parser.add_argument('--policy', choices=pipeline.POLICIES, default='drpruning')
    parser.add_argument('--source', default=str(pipeline.DEFAULT_SOURCE), help='HF directory of the source model')
    parser.add_argument('--work', default='runs/demo', help='where runs, models and the report go')
    parser.add_argument('--path', choices=pipeline.PATHS, default=pipeline.DEFAULT_PATH,
                        help=f'how to prune: oneshot (activation importance) or l0 (learned masks); default '
                             f'{pipeline.DEFAULT_PATH}')
    parser.add_argument('--prune-steps', type=int, default=20, help='l0 path: pruning steps')
    parser.add_argument('--mask-init', choices=('importance', 'constant'), default='importance',
                        help='l0 path: drp_mask_learner init (constant = the paper)')
    parser.add_argument('--constraint', choices=('projection', 'lagrangian'), default='projection',
                        help='l0 path: the size constraint (projection = ours, on target in every layer at any '
                             'length; lagrangian = the paper, needs hundreds of steps to settle)')
    parser.add_argument('--continue-steps', type=int, default=120,
                        help='continued pretraining steps of 4 x 128 tokens (default 120: what fits the demo\'s '
                             '12 minutes on 2 cores without bf16 instructions; docs/RESULTS.md, "Demo budget")')
    parser.add_argument('--continue-lr', type=float, default=8e-4)
    parser.add_argument('--distill-alpha', type=float, default=0.0,
                        help='weight of the KL to the source model (drp_distillation; e.g. 0.5); 0 (default): off. '
                             'In the demo\'s 12 minutes, 120 plain steps scored as well as 70 distilled ones '
                             '(docs/RESULTS.md, "Demo budget")')
    parser.add_argument('--precision', choices=('auto', 'fp32', 'bf16'), default='auto',
                        help='auto (default): bf16 where the CPU has bf16 matrix instructions (AVX512-BF16, AMX), '
                             'else fp32. bf16: the training stages run their forward, loss and teacher under bf16 '
                             'autocast (drp_cpu_autocast; 1.3x faster per step on a CPU with bf16 instructions, '
                             '17x slower on an AVX2-only one: bench/cpu_autocast_step.py); evaluation stays fp32. '
                             'fp32: no autocast')
    parser.add_argument('--unlikelihood-alpha', type=float, default=0.0,
                        help='opt-in: weight of the token-level unlikelihood term against repetition loops '
                             '(drp_unlikelihood; ours); 0 (default): off')
    parser.add_argument('--sequence-unlikelihood-alpha', type=float, default=0.0,
                        help='opt-in: weight of the sequence-level unlikelihood term on the model\'s own greedy '
                             'continuations (drp_sequence_unlikelihood; ours); 0 (default): off')
    parser.add_argument('--sequence-unlikelihood-every', type=int, default=1,
                        help='apply the sequence-level term on every N-th batch')
    parser.add_argument('--sequence-unlikelihood-start', default='0.5dur',
                        help='apply the sequence-level term from this point of the run on (a fraction "0.5dur" or '
                             'a batch count "100ba")')
    parser.add_argument('--loop-rate', action='store_true',
                        help='opt-in: also measure the greedy loop rate (no repetition control) of the source and '
                             'the continued model on 112 held-out prefixes (drp-loop-rate; a few minutes)')
    parser.add_argument('--seed', type=int, default=17,
                        help='the training stages\' seed (variables.global_seed: initialisation, data order, mask noise)')
    parser.add_argument('--eval-every', type=int, default=20)
    parser.add_argument('--save-every', type=int, default=60,
                        help='training stages: steps between checkpoints (a stopped demo resumes from the last '
                             'one; the last step is always saved). A checkpoint of the 50M model and its optimizer '
                             'takes seconds to write, so not every eval gets one')
    parser.add_argument('--max-seq-len', type=int, default=128)
    parser.add_argument('--reference-losses', help='JSON {domain: loss} for a model of the target size')
    parser.add_argument('--fresh', action='store_true', help='delete --work first')
    parser.add_argument('--check', action='store_true',
                        help='resolve every file, recipe and module the stages use, print them and exit '
                             '(writes nothing)')
    return parser


def main(argv: list[str] | None = None) -> int:
    return pipeline.run_demo(build_parser().parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
