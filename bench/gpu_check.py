"""One prepared GPU check: masked pruning step vs plain step, peak memory, export fidelity.

Run on a machine with one GPU (an H100 takes a few minutes for the default ~1.1B model):

    bash bench/gpu_check.sh                 # defaults: random Llama ~1.1B, bf16, 4 x 2048 tokens
    bash bench/gpu_check.sh --tiny          # seconds, CPU or GPU: the smoke test the suite runs

It needs only torch and transformers (the GPU machine has neither Composer nor Foundry):
``bench/gpu_check.sh`` puts the repository root on ``PYTHONPATH`` so that the pure-torch
``drp_foundry.pruning`` package is importable without installing it.

What it measures, on a random Llama of the Sheared-LLaMA shape family:

1. plain training step (forward, LM loss, backward, AdamW step) of the unmasked model;
2. masked pruning step: the same with the L0 masks injected (hard-concrete samples every
   forward), the Lagrangian penalty added, masks and lambdas in their own parameter groups
   (fp32, as the recipes keep them);
3. peak memory of each (``torch.cuda.max_memory_allocated``; CPU: not measured);
4. the exported (folded + sliced) model's logits vs the masked model's logits with the
   deterministic target masks, in the run dtype (bf16 on GPU): max / mean absolute difference
   and argmax agreement.

The last line is ``masked/plain step time ratio: R (goal <= 1.10)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.export import count_model_parameters, fold_and_slice
from drp_foundry.pruning.hf_injection import inject_masks, remove_masks
from drp_foundry.pruning.lagrangian import lagrangian_terms
from drp_foundry.pruning.mask_module import L0MaskModule

# name: (layers, hidden, heads, kv_heads, ffn, vocab) -> target (layers, hidden, heads, ffn)
PRESETS = {
    # ~1.1B parameters (TinyLlama's shape), GQA 32 query / 8 KV heads.
    '1b': ((22, 2048, 32, 8, 5632, 32000), (16, 1536, 24, 4096)),
    # seconds on a CPU: the suite's smoke test.
    'tiny': ((4, 128, 8, 2, 256, 512), (3, 96, 4, 160)),
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='GPU check for drp-foundry: bf16 masked pruning step vs plain step on a random Llama '
                    '(about 1.1B parameters by default), peak memory of both, and exported vs masked logits. '
                    'Needs only torch and transformers. Last line: the step-time ratio (goal <= 1.10).')
    parser.add_argument('--preset', choices=sorted(PRESETS), default='1b', help='model size (default 1b)')
    parser.add_argument('--tiny', action='store_true', help='shorthand for --preset tiny --batch 2 --seq 64 --steps 3')
    parser.add_argument('--batch', type=int, default=4, help='sequences per step (default 4)')
    parser.add_argument('--seq', type=int, default=2048, help='tokens per sequence (default 2048)')
    parser.add_argument('--steps', type=int, default=10, help='timed steps per variant after warm-up (default 10)')
    parser.add_argument('--warmup-steps', type=int, default=3, help='untimed steps first (default 3)')
    parser.add_argument('--device', default=None, help="'cuda' or 'cpu' (default: cuda when available)")
    parser.add_argument('--dtype', choices=('bf16', 'fp32'), default=None,
                        help='model dtype (default: bf16 on cuda, fp32 on cpu)')
    parser.add_argument('--attn', default='sdpa', help="attn_implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.batch, args.seq, args.steps, args.warmup_steps = 'tiny', 2, 64, 3, 1
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.dtype is None:
        args.dtype = 'bf16' if args.device.startswith('cuda') else 'fp32'
    for name in ('batch', 'seq', 'steps'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1')
    return args


def build_model(preset: str, dtype: torch.dtype, device: str, attn: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    (layers, hidden, heads, kv_heads, ffn, vocab), _ = PRESETS[preset]
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return model


def target_for(preset: str, model) -> TargetArchitecture:
    _, (layers, hidden, heads, ffn) = PRESETS[preset]
    source = DecoderArchitecture.from_hf_config(model.config)
    return TargetArchitecture(layers=layers, hidden=hidden, heads=heads, intermediate=ffn).resolve(source)


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith('cuda') else None


def _reset_peak(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_steps(step, device: str, warmup: int, steps: int) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def make_plain_step(model, batch: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def make_masked_step(model, batch: torch.Tensor, mask_module: L0MaskModule):
    """Masked pruning step: LM loss + Lagrangian, masks lr 1.0 and lambdas ascending (paper settings)."""
    optimizer = torch.optim.AdamW([
        {'params': [p for n, p in model.named_parameters() if not n.startswith('drp_masks.')], 'lr': 1e-5},
        {'params': mask_module.mask_parameters(), 'lr': 1.0, 'weight_decay': 0.0},
        {'params': mask_module.lambda_parameters(), 'lr': 1.0, 'weight_decay': 0.0},
    ])
    targets = mask_module.target_sizes()

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        terms = mask_module.take_size_terms()
        penalties = lagrangian_terms(terms.expected, targets, terms.lambda_1, terms.lambda_2)
        total = loss + torch.stack(list(penalties.values())).sum().to(loss.dtype)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


@torch.no_grad()
def export_fidelity(model, mask_module: L0MaskModule, batch: torch.Tensor) -> dict[str, float]:
    """Masked (eval, target masks) vs exported logits, in the model's dtype."""
    model.eval()
    mask_module.fixed_masks = mask_module.deterministic('target')
    masked_logits = model(input_ids=batch).logits.float()
    masks = {key: value.detach() for key, value in mask_module.fixed_masks.items()}
    mask_module.fixed_masks = None
    exported, report = fold_and_slice(model, masks)
    exported = exported.to(device=batch.device, dtype=next(model.parameters()).dtype).eval()
    exported_logits = exported(input_ids=batch).logits.float()
    diff = (masked_logits - exported_logits).abs()
    agree = (masked_logits.argmax(-1) == exported_logits.argmax(-1)).float().mean()
    return {'max_abs_diff': float(diff.max()), 'mean_abs_diff': float(diff.mean()),
            'logit_scale': float(masked_logits.abs().mean()), 'argmax_agreement': float(agree),
            'exported_parameters': count_model_parameters(exported),
            'target_parameters': mask_module.target_num_parameters(), 'report_after': report.params_after}


def main(argv: list[str] | None = None) -> float:
    args = _parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    device = args.device
    print(f'[gpu_check] torch {torch.__version__}, device {device}'
          + (f' ({torch.cuda.get_device_name()})' if device.startswith('cuda') else '')
          + f', dtype {args.dtype}, preset {args.preset}, batch {args.batch} x {args.seq} tokens, attn {args.attn}',
          flush=True)
    model = build_model(args.preset, dtype, device, args.attn, args.seed)
    model.train()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
    print(f'[gpu_check] source parameters: {count_model_parameters(model):,}', flush=True)

    _reset_peak(device)
    plain_times = time_steps(make_plain_step(model, batch), device, args.warmup_steps, args.steps)
    plain_peak = _peak_memory_gib(device)

    mask_module = L0MaskModule(DecoderArchitecture.from_hf_config(model.config), target_for(args.preset, model))
    mask_module.to(device)  # masks and lambdas stay fp32 whatever the model dtype
    inject_masks(model, mask_module)
    model.train()
    _reset_peak(device)
    masked_times = time_steps(make_masked_step(model, batch, mask_module), device, args.warmup_steps, args.steps)
    masked_peak = _peak_memory_gib(device)

    fidelity = export_fidelity(model, mask_module, batch[:1, : min(args.seq, 256)])
    remove_masks(model)

    plain, masked = statistics.median(plain_times), statistics.median(masked_times)
    tokens = args.batch * args.seq
    print(f'[gpu_check] plain step:  median {plain * 1e3:.1f} ms ({tokens / plain:,.0f} tokens/s)'
          + (f', peak memory {plain_peak:.2f} GiB' if plain_peak is not None else ''))
    print(f'[gpu_check] masked step: median {masked * 1e3:.1f} ms ({tokens / masked:,.0f} tokens/s)'
          + (f', peak memory {masked_peak:.2f} GiB' if masked_peak is not None else ''))
    if plain_peak is not None:
        print(f'[gpu_check] peak memory masked/plain: {masked_peak / plain_peak:.3f}')
    print(f"[gpu_check] export ({args.dtype}): max |masked - exported| logit {fidelity['max_abs_diff']:.3g}, "
          f"mean {fidelity['mean_abs_diff']:.3g} (mean |logit| {fidelity['logit_scale']:.3g}), "
          f"argmax agreement {fidelity['argmax_agreement']:.4f}; exported parameters "
          f"{fidelity['exported_parameters']:,} (target {fidelity['target_parameters']:,})")
    ratio = masked / plain
    print(f'masked/plain step time ratio: {ratio:.3f} (goal <= 1.10)')
    return ratio


if __name__ == '__main__':
    main(sys.argv[1:])
