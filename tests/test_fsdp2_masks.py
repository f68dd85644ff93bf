"""The mask module under FSDP2, in one process (gloo, world size 1), and the checkpoint formats FSDP2 needed.

The 2-rank runs are in tests/test_sharded_training.py; here the parts that can be checked in a
second: the masks and lambdas stay float32 in the forward and its gradients when FSDP2 casts the
weights to bf16 (``shard_mask_module``), the lambdas' (1,) shape loads older scalar checkpoints,
the state records keep one structure before and after the first update (what a sharded
checkpoint load needs), and the eval-mask cache sees values changed behind the version counter.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.hf_injection import inject_masks, shard_mask_module
from drp_foundry.pruning.lagrangian import lagrangian_terms
from drp_foundry.pruning.mask_module import L0MaskModule

TARGET = TargetArchitecture(layers=2, hidden=48, heads=2, kv_heads=1, intermediate=64)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _masks(model) -> L0MaskModule:
    return L0MaskModule(DecoderArchitecture.from_hf_config(model.config), TARGET)


@pytest.fixture
def gloo_world_of_one(tmp_path):
    import torch.distributed as tdist

    if tdist.is_initialized():
        pytest.fail('a process group is already initialised in this test process')
    tdist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def _sharded_forward(shard_masks: bool):
    """One training forward + backward of a tiny Llama under FSDP2 with bf16 weights; what the masks saw."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    model = _tiny_llama()
    masks = _masks(model)
    inject_masks(model, masks)
    if shard_masks:
        shard_mask_module(masks)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.train()
    seen = {}
    handle = model.register_forward_pre_hook(  # runs after ours: what the masks were computed from
        lambda module, args: seen.update(log_alpha=masks.log_alpha('hidden').dtype,
                                         mask=masks.current_masks['hidden'].dtype))
    logits = model(torch.randint(0, 256, (2, 16))).logits
    handle.remove()
    terms = masks.take_size_terms()
    penalty = sum(lagrangian_terms(terms.expected, masks.target_sizes(), terms.lambda_1, terms.lambda_2).values())
    (logits.float().logsumexp(-1).mean() + penalty).backward()
    grad = masks.log_alpha('hidden').grad
    assert isinstance(masks.log_alpha('hidden'), DTensor) and grad is not None  # sharded again, gradient there
    return seen, terms, grad


def test_fsdp2_keeps_masks_float32_under_bf16_weights(gloo_world_of_one):
    seen, terms, grad = _sharded_forward(shard_masks=True)
    assert seen == {'log_alpha': torch.float32, 'mask': torch.float32}
    assert terms.expected['hidden'].dtype == torch.float32 and terms.lambda_1['hidden'].dtype == torch.float32
    assert terms.lambda_1['hidden'].shape == ()
    assert grad.dtype == torch.float32 and float(grad.full_tensor().abs().sum()) > 0


def test_fsdp2_without_own_unit_reads_bf16_masks(gloo_world_of_one):
    """What shard_mask_module prevents: in the model's unit the log-alphas are cast with the weights."""
    seen, terms, _ = _sharded_forward(shard_masks=False)
    assert seen['log_alpha'] == torch.bfloat16
    assert terms.lambda_1['hidden'].dtype == torch.bfloat16


def test_scalar_lambdas_of_older_checkpoints_load():
    model = _tiny_llama()
    masks = _masks(model)
    with torch.no_grad():
        masks.lambda_1('hidden').fill_(0.25)
    old = {key: value.reshape(()) if key.startswith('lambda_') else value
           for key, value in masks.state_dict().items()}
    assert old['lambda_1_hidden'].shape == ()
    fresh = _masks(model)
    fresh.load_state_dict(old)
    assert fresh.lambda_1('hidden').shape == (1,) and float(fresh.lambda_1('hidden')) == 0.25
    assert fresh.lambdas()[0]['hidden'].shape == ()


def test_extra_state_keeps_its_structure_and_reads_the_older_mapping():
    model = _tiny_llama()
    masks = _masks(model)
    before = masks.get_extra_state()
    masks.train()
    masks.record_size_terms()
    after = masks.get_extra_state()
    assert before.keys() == after.keys()
    assert isinstance(before['last_size_terms'], str) and isinstance(after['last_size_terms'], str)
    restored = _masks(model)
    restored.set_extra_state(after)
    assert restored.last_size_terms.num_parameters == masks.last_size_terms.num_parameters
    older = dict(after, last_size_terms=json.loads(after['last_size_terms']))  # the mapping itself
    again = _masks(model)
    again.set_extra_state(older)
    assert again.last_size_terms.num_parameters == masks.last_size_terms.num_parameters


def test_dynamic_loading_state_is_one_string_and_reads_the_older_mapping():
    from drp_foundry.composer.dynamic_loading import DynamicLoading

    callback = DynamicLoading(policy={'name': 'constant'}, plot_folder=None)
    callback.trajectory = [{'step': 2, 'q': [0.5, 0.5], 'eval_losses': [float('nan'), 1.0]}]
    state = callback.state_dict()
    assert list(state) == ['json'] and isinstance(state['json'], str)
    fresh = DynamicLoading(policy={'name': 'constant'}, plot_folder=None)
    fresh.load_state_dict(state)
    assert fresh.trajectory[0]['q'] == [0.5, 0.5] and fresh.trajectory[0]['step'] == 2
    older = DynamicLoading(policy={'name': 'constant'}, plot_folder=None)
    older.load_state_dict({'policy_state': None, 'trajectory': [{'step': 4}]})
    assert older.trajectory == [{'step': 4}]


def test_eval_masks_follow_values_changed_behind_the_version_counter():
    """FSDP2 gathers into the same tensor without bumping its version: the cache must compare values."""
    model = _tiny_llama()
    masks = _masks(model)
    masks.eval()
    first = masks.deterministic('target')['hidden'].clone()
    log_alpha = masks.log_alpha('hidden')
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(log_alpha):
        log_alpha.copy_(torch.linspace(-3.0, 3.0, log_alpha.numel()))
    second = masks.deterministic('target')['hidden']
    assert not torch.equal(first, second)
    assert torch.equal(second != 0, torch.arange(log_alpha.numel()) >= log_alpha.numel() - TARGET.hidden)


def test_scalar_lambda_optimizer_state_of_older_checkpoints_is_reshaped():
    from drp_foundry.composer.mask_learner import add_mask_param_groups, reshape_scalar_lambda_state

    model = _tiny_llama()
    masks = _masks(model)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    add_mask_param_groups(optimizer, masks, mask_lr=0.1, lambda_lr=0.1)
    lam = masks.lambda_1('hidden')
    optimizer.state[lam] = {'step': torch.tensor(3.0), 'exp_avg': torch.tensor(0.1), 'exp_avg_sq': torch.tensor(0.01)}
    lam.grad = torch.ones(1)
    with pytest.raises(RuntimeError):  # what resuming such a checkpoint did
        optimizer.step()
    optimizer.state[lam] = {'step': torch.tensor(3.0), 'exp_avg': torch.tensor(0.1), 'exp_avg_sq': torch.tensor(0.01)}
    assert reshape_scalar_lambda_state(optimizer) == 2
    optimizer.step()
    assert optimizer.state[lam]['exp_avg'].shape == (1,) and optimizer.state[lam]['step'].shape == ()


def test_importance_init_writes_the_shards_of_an_fsdp2_mask_module(gloo_world_of_one):
    """``init: importance`` under FSDP2: the log-alphas computed from the scores land in the DTensor shards."""
    from torch.distributed.tensor import DTensor

    model = _tiny_llama()
    plain, sharded = _masks(model), _masks(model)
    inject_masks(model, sharded)
    shard_mask_module(sharded)
    torch.manual_seed(1)
    scores = {key: torch.rand(plain.log_alpha(key).shape) for key in plain.granularities}
    plain.init_from_importance(scores)
    sharded.init_from_importance(scores)
    for key in plain.granularities:
        assert isinstance(sharded.log_alpha(key), DTensor)
        assert torch.equal(sharded.log_alpha(key).full_tensor(), plain.log_alpha(key).detach())
