"""Step-time overhead of L0 masks: (fwd + bwd + optimizer step) masked / unmasked, same model, one run.

The same HF Llama is timed step by step, alternately without masks and with masks injected
(``drp_foundry.pruning.hf_injection``) plus the Lagrangian penalty, so that load drifts on a
shared machine affect both alike. Prints the median step times, a breakdown of the masked
step's extra work, and on its last line the median over step pairs of masked/unmasked.

    python bench/mask_overhead.py                       # CPU, fp32, a ~20M-parameter Llama
    python bench/mask_overhead.py --device cuda --dtype bfloat16 --hidden 2048 --layers 8 --seq 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drp_foundry.composer.lagrangian_updater import apply_lagrangian
from drp_foundry.composer.mask_learner import add_mask_param_groups
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.hf_injection import inject_masks, remove_masks
from drp_foundry.pruning.mask_module import L0MaskModule


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--hidden', type=int, default=512)
    parser.add_argument('--layers', type=int, default=4)
    parser.add_argument('--heads', type=int, default=8)
    parser.add_argument('--kv-heads', type=int, default=8)
    parser.add_argument('--intermediate', type=int, default=1376)
    parser.add_argument('--vocab', type=int, default=8000)
    parser.add_argument('--seq', type=int, default=256)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--pairs', type=int, default=16, help='timed (masked, unmasked) step pairs')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--attn', default='sdpa', choices=['eager', 'sdpa', 'flash_attention_2'])
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave as is)')
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def one_step(model, optimizer, batch, masked, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    if masked:
        loss = apply_lagrangian(model, loss, step=0, warmup_steps=10)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def op_times(model, optimizer, batch, masked, device) -> dict[str, float]:
    """Self time per operator (ms) of one step, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        one_step(model, optimizer, batch, masked, device)
    use_cuda = device.type == 'cuda'
    return {event.key: (event.self_device_time_total if use_cuda else event.self_cpu_time_total) / 1e3
            for event in prof.key_averages()}


def mask_preparation_time(masks: L0MaskModule, device, repeats=20) -> float:
    """Seconds per forward spent drawing masks and the size terms (the top-model pre-hook)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        masks.masks_for_forward()
        masks.record_size_terms()
    synchronize(device)
    masks.take_size_terms()  # drop the recorded graph
    return (time.perf_counter() - start) / repeats


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
    model = LlamaForCausalLM._from_config(config, attn_implementation=args.attn, torch_dtype=dtype).to(device).train()
    arch = DecoderArchitecture.from_hf_config(config)
    target = TargetArchitecture(layers=max(1, args.layers // 2), hidden=args.hidden // 2,
                                heads=args.heads // 2 if args.kv_heads == args.heads else args.heads // args.kv_heads,
                                intermediate=args.intermediate // 2).resolve(arch)
    masks = L0MaskModule(arch, target).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    add_mask_param_groups(optimizer, masks, mask_lr=0.1, lambda_lr=0.1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    print(f'model: {arch.count_parameters() / 1e6:.1f}M parameters, batch {args.batch} x {args.seq}, '
          f'{args.device} {args.dtype} {args.attn}, threads {torch.get_num_threads()}')

    # Steps alternate masked / unmasked (order flipped every pair), so load drifts on a shared
    # machine hit both alike; the figure is the median of the per-pair ratios.
    for masked in (False, True):  # warm-up
        if masked:
            inject_masks(model, masks)
        one_step(model, optimizer, batch, masked, device)
        if masked:
            remove_masks(model)
    unmasked, masked, ratios = [], [], []
    for pair in range(args.pairs):
        times = {}
        for use_masks in ((False, True) if pair % 2 == 0 else (True, False)):
            if use_masks:
                inject_masks(model, masks)
            times[use_masks] = one_step(model, optimizer, batch, use_masks, device)
            if use_masks:
                remove_masks(model)
        unmasked.append(times[False])
        masked.append(times[True])
        ratios.append(times[True] / times[False])
    inject_masks(model, masks)
    preparation = mask_preparation_time(masks, device)
    profiled_masked = op_times(model, optimizer, batch, True, device)
    remove_masks(model)
    profiled_plain = op_times(model, optimizer, batch, False, device)
    extra = sorted(((profiled_masked.get(k, 0.0) - profiled_plain.get(k, 0.0), k) for k in profiled_masked),
                   reverse=True)[:5]

    base, with_masks = statistics.median(unmasked), statistics.median(masked)
    print(f'median step: unmasked {base * 1e3:.1f} ms, masked {with_masks * 1e3:.1f} ms')
    print(f'extra per step {max(with_masks - base, 0.0) * 1e3:.1f} ms: drawing masks + size terms (top-model '
          f'pre-hook) {preparation * 1e3:.2f} ms; the rest is the activation-sized mask products (embedding, and per '
          f'layer o_proj input/output and down_proj input/output: {4 * args.layers + 1} in all) forward and backward')
    print('largest per-operator increases in one profiled step (ms): ' +
          ', '.join(f'{name} +{delta:.1f}' for delta, name in extra))
    print(f'per-pair ratios: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}, max {max(ratios):.3f} '
          f'over {len(ratios)} pairs')
    print(f'masked/unmasked step time: {statistics.median(ratios):.3f}')


if __name__ == '__main__':
    main()
