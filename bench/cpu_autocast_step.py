"""Step time of the demo's continued pretraining, fp32 vs bf16 autocast on CPU (``drp_cpu_autocast``).

One step = the student's forward and loss, the teacher's forward and the KL (``drp_distillation``'s
``apply_distillation``, alpha 0.5), backward and an AdamW step: what the demo's continued-pretraining
stage does per batch of 4 x 128 tokens. fp32 and bf16 steps alternate, so load drifts on a shared
machine affect both alike. Prints the median step times and, on its last line, fp32 / bf16.

    python bench/cpu_autocast_step.py --student runs/demo/models/pruned-oneshot-drpruning \\
        --teacher models/smollm2-135m
    python bench/cpu_autocast_step.py --random       # no models needed: a 4-layer random student and teacher
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from drp_foundry.composer.distillation import apply_distillation


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--student', help='HF folder of the student (the demo: its one-shot export)')
    parser.add_argument('--teacher', help='HF folder of the teacher (the demo: SmolLM2-135M)')
    parser.add_argument('--random', action='store_true', help='random 4-layer Llamas instead of --student/--teacher')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--seq', type=int, default=128)
    parser.add_argument('--steps', type=int, default=6, help='timed steps of each kind (after one warm-up each)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s)')
    args = parser.parse_args(argv)
    if not args.random and not (args.student and args.teacher):
        parser.error('give --student and --teacher, or --random')
    return args


def load(args):
    if args.random:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(config), LlamaForCausalLM(config).eval()
    student = AutoModelForCausalLM.from_pretrained(args.student, torch_dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, torch_dtype=torch.float32).eval()
    return student, teacher


def main(argv=None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    student, teacher = load(args)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    vocab = student.config.vocab_size
    batch = {'input_ids': torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))}
    batch['labels'] = batch['input_ids']

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            out = student(**batch)
            loss, _ = apply_distillation(out.loss, out.loss, out.logits, teacher, batch, 0.5, 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step(False), step(True)  # warm-up
    times = {False: [], True: []}
    for _ in range(args.steps):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f'{args.batch} x {args.seq} tokens, torch threads {torch.get_num_threads()}, {args.steps} steps each')
    print(f'median step: fp32 {fp32:.2f} s, bf16 autocast {bf16:.2f} s')
    print(f'fp32 / bf16 step time: {fp32 / bf16:.2f}')
    return fp32 / bf16


if __name__ == '__main__':
    main()
