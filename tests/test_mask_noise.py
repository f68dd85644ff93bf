"""Mask noise: counter-based, per rank, restored with the checkpoint; untouched by the global RNG."""

import torch
from conftest import tiny_gqa_config

from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.mask_module import L0MaskModule


def _masks(seed: int = 5, rank: int = 0) -> L0MaskModule:
    source = DecoderArchitecture.from_hf_config(tiny_gqa_config())
    module = L0MaskModule(source, TargetArchitecture(layers=2, hidden=48, heads=3, intermediate=80))
    module.noise_seed, module.noise_rank = seed, rank
    return module


def _draws(module: L0MaskModule, n: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in module.sample().items()} for _ in range(n)]


def _equal(a, b) -> bool:
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_resumed_module_draws_the_uninterrupted_noise():
    full = _masks()
    reference = _draws(full, 7)
    first = _masks()
    _draws(first, 3)
    state = first.state_dict()
    torch.manual_seed(1234)  # a trainer re-seeds the global RNG at start: must not matter
    resumed = _masks(seed=99)  # fresh module, other seed: the checkpoint brings seed and counter back
    resumed.load_state_dict(state)
    assert resumed.noise_draws == 3 and resumed.noise_seed == 5
    assert _equal(_draws(resumed, 4), reference[3:])


def test_global_rng_does_not_change_the_noise():
    a, b = _masks(), _masks()
    torch.manual_seed(0)
    x = _draws(a, 2)
    torch.manual_seed(1)
    torch.rand(10)
    y = _draws(b, 2)
    assert _equal(x, y)


def test_ranks_and_draws_get_different_noise():
    r0, r1 = _draws(_masks(rank=0), 2), _draws(_masks(rank=1), 2)
    assert not torch.equal(r0[0]['hidden'], r1[0]['hidden'])
    assert not torch.equal(r0[0]['hidden'], r0[1]['hidden'])


def test_eval_masks_draw_nothing():
    module = _masks()
    module.eval()
    module.masks_for_forward()
    assert module.noise_draws == 0
    module.train()
    module.masks_for_forward()
    assert module.noise_draws == 1
