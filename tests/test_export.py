"""Export: folding deterministic masks into the weights and slicing gives the same logits, the target
size, a stock HF folder; the CLI reads real Composer checkpoints and refuses bad input cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_gqa_config, tiny_llama_config
from transformers import AutoModelForCausalLM

from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.expected_size import GRANULARITIES, expected_num_parameters
from drp_foundry.pruning.export import count_model_parameters, fold_and_slice
from drp_foundry.pruning.hf_injection import inject_masks
from drp_foundry.pruning.mask_module import L0MaskModule

# Target of every granularity from Llama 4/64/4 heads (4 KV)/128, Qwen2 4/96/6 heads (2 KV)/160,
# Mistral 4/64/4 heads (2 KV)/128.
PRUNED = {
    'llama': dict(layers=3, hidden=48, heads=2, kv_heads=2, intermediate=96),
    'qwen2': dict(layers=3, hidden=64, heads=3, kv_heads=1, intermediate=120),
    'mistral': dict(layers=3, hidden=48, heads=2, kv_heads=1, intermediate=96),
}
TARGET_FIELDS = {'layer': ('layers',), 'head': ('heads', 'kv_heads'), 'intermediate': ('intermediate',),
                 'hidden': ('hidden',)}
GRANULARITY_CASES = [(key,) for key in GRANULARITIES] + [GRANULARITIES]
CONFIGS = {'llama': tiny_llama_config, 'qwen2': tiny_gqa_config}


def target_for(source: DecoderArchitecture, granularities) -> TargetArchitecture:
    """The source sizes, with the pruned sizes of ``granularities`` only."""
    values = source.target().to_dict()
    for key in granularities:
        for field in TARGET_FIELDS[key]:
            values[field] = PRUNED[source.model_type][field]
    return TargetArchitecture(**values)


def randomise_weights_(hf_model: torch.nn.Module, seed: int) -> None:
    """Weights, biases and norm gains far from their init (zeros, ones), so slicing errors show in logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if name.startswith('drp_masks.'):
                continue
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.3 * noise if 'norm' in name else 0.15 * noise)


def masked_model(model_type: str, granularities, seed: int = 0, config=None):
    """A random tiny HF model with injected masks whose log-alphas spread so soft values are far from 1."""
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config if config is not None else CONFIGS[model_type]())
    randomise_weights_(hf_model, seed)
    source = DecoderArchitecture.from_hf_config(hf_model.config)
    mask_module = L0MaskModule(source, target_for(source, granularities), granularities=granularities,
                               init_mean=0.0, init_std=2.0, eval_mode='target')
    inject_masks(hf_model, mask_module)
    return hf_model.eval(), mask_module


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def random_tokens(seed: int = 1, vocab_size: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


# Masked vs exported logits for every family and granularity: tests/test_model_families.py.


@pytest.mark.parametrize('model_type', ['llama', 'qwen2'])
def test_exported_size_is_target_and_expected_size_formula(model_type):
    hf_model, mask_module = masked_model(model_type, GRANULARITIES, seed=3)
    masks = mask_module.deterministic('target')
    pruned_model, report = fold_and_slice(hf_model, masks)

    target_count = mask_module.source.pruned(mask_module.target).count_parameters()
    formula_count = expected_num_parameters(mask_module.source, {key: (mask != 0).float()
                                                                 for key, mask in masks.items()})
    assert count_model_parameters(pruned_model) == report.params_after == target_count
    assert int(formula_count.item()) == target_count
    assert report.params_before == mask_module.source.count_parameters()
    target = mask_module.target
    config = pruned_model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size) == (target.layers, target.hidden, target.heads, target.kv_heads,
                                          target.intermediate)
    for layer in report.kept_layers:
        assert len(layer.kv_groups) == target.kv_heads
        assert len(layer.query_heads) == target.heads
        assert len(layer.intermediate_dims) == target.intermediate


def test_source_model_is_left_unchanged():
    hf_model, mask_module = masked_model('qwen2', GRANULARITIES)
    before = {key: value.clone() for key, value in hf_model.state_dict().items() if torch.is_tensor(value)}
    fold_and_slice(hf_model, mask_module.deterministic('target'))
    after = hf_model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_non_uniform_head_counts_are_refused():
    hf_model, mask_module = masked_model('llama', ('head',))
    masks = mask_module.deterministic('target')
    masks['head'][1] = torch.tensor([0.5, 0.4, 0.3, 0.0])  # 3 groups in layer 1, 2 elsewhere
    with pytest.raises(ValueError, match=r"mask 'head' keeps a different number of entries"):
        fold_and_slice(hf_model, masks)


def test_masks_of_another_shape_are_refused():
    hf_model, _ = masked_model('llama', ('hidden',))
    with pytest.raises(ValueError, match=r"mask 'hidden' has shape \(96,\) but the model needs \(64,\)"):
        fold_and_slice(hf_model, {'hidden': torch.ones(96)})


def test_a_qwen2_export_with_uneven_heads_writes_head_dim_and_reloads(tmp_path):
    """hidden 64 over 3 heads: the exported config must say head_dim 16 (transformers would derive 64 // 3).
    Every family's export reloading in a fresh interpreter without drp_foundry: tests/test_model_families.py."""
    hf_model, mask_module = masked_model('qwen2', GRANULARITIES)
    pruned_model, _ = fold_and_slice(hf_model, mask_module.deterministic('target'))
    pruned_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['head_dim'] == 16 and config['hidden_size'] == 64
    tokens = random_tokens()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(tokens).logits, logits(hf_model, tokens), atol=1e-4, rtol=0)


# --- the CLI on real Composer checkpoints ------------------------------------------------------------------------

COMPOSER_TARGET = dict(layers=3, hidden=64, heads=3, kv_heads=1, intermediate=120)


@pytest.fixture(scope='module')
def composer_run(tmp_path_factory, tiny_tokenizer):
    """Two Trainer steps of LLM-Foundry's ComposerHFCausalLM (tiny Qwen2, tied) with the mask learner."""
    from composer import Trainer
    from llmfoundry.models.hf import ComposerHFCausalLM

    from drp_foundry.composer.mask_learner import MaskLearner

    root = tmp_path_factory.mktemp('composer_run')
    tiny_gqa_config(vocab_size=len(tiny_tokenizer)).save_pretrained(root / 'source_config')
    torch.manual_seed(0)
    model = ComposerHFCausalLM(tokenizer=tiny_tokenizer, pretrained_model_name_or_path=str(root / 'source_config'),
                               pretrained=False)
    randomise_weights_(model.model, seed=0)
    tokens = torch.randint(0, len(tiny_tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    batches = [{'input_ids': tokens[i:i + 4], 'attention_mask': torch.ones_like(tokens[i:i + 4]),
                'labels': tokens[i:i + 4]} for i in (0, 4)]
    trainer = Trainer(model=model, train_dataloader=batches, max_duration='2ba', device='cpu', device_train_microbatch_size=4,
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
                      algorithms=[MaskLearner(target=COMPOSER_TARGET, init_mean=0.0, init_std=2.0,
                                              eval_mask_mode='target')],
                      save_folder=str(root / 'checkpoints'), save_interval='2ba', save_num_checkpoints_to_keep=-1,
                      progress_bar=False, log_to_console=False)
    trainer.fit()
    checkpoint = root / 'checkpoints' / 'ep0-ba2-rank0.pt'
    assert checkpoint.is_file()
    hf_model = model.model.eval()
    test_tokens = random_tokens(vocab_size=len(tiny_tokenizer))
    return {'root': root, 'checkpoint': checkpoint, 'tokens': test_tokens, 'masked_logits': logits(hf_model, test_tokens),
            'mask_module': hf_model.drp_masks}


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if '.tmp-' in path.name or '.old-' in path.name)


def test_cli_exports_monolithic_composer_checkpoint(composer_run, tmp_path, tiny_tokenizer):
    from drp_foundry.commands.export import main

    out_dir = tmp_path / 'pruned'
    assert main([str(composer_run['checkpoint']), str(out_dir)]) == 0

    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert torch.allclose(logits(model, composer_run['tokens']), composer_run['masked_logits'], atol=1e-4, rtol=0)
    assert count_model_parameters(model) == composer_run['mask_module'].target_num_parameters()
    report = json.loads((out_dir / 'pruning_report.json').read_text())
    assert report['params_after'] == count_model_parameters(model)
    # the tied source (Qwen2, tie_word_embeddings) is counted with its LM head shared
    assert report['params_before'] == composer_run['mask_module'].source.count_parameters()
    assert report['pruned_sizes']['num_hidden_layers'] == COMPOSER_TARGET['layers']
    assert len(report['kept_layers']) == COMPOSER_TARGET['layers']
    assert all(len(layer['kv_groups']) == COMPOSER_TARGET['kv_heads'] for layer in report['kept_layers'])
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(out_dir).get_vocab() == tiny_tokenizer.get_vocab()
    assert any(out_dir.glob('*.safetensors'))
    assert leftovers(tmp_path) == []


def test_cli_exports_sharded_checkpoint_in_bfloat16(composer_run, tmp_path):
    """A torch.distributed.checkpoint folder of the same state (the layout Composer's sharded save writes)."""
    import torch.distributed.checkpoint as dcp

    from drp_foundry.export import export_checkpoint

    state = torch.load(composer_run['checkpoint'], map_location='cpu', weights_only=False)
    sharded = tmp_path / 'sharded'
    dcp.save({'state': state['state']}, checkpoint_id=str(sharded), no_dist=True)
    out_dir = tmp_path / 'pruned'
    report = export_checkpoint(sharded, out_dir, dtype='bfloat16')

    assert json.loads((out_dir / 'config.json').read_text())['torch_dtype'] == 'bfloat16'
    model = AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype='auto')
    assert model.dtype == torch.bfloat16
    assert report.params_after == count_model_parameters(model)
    reloaded = logits(model.float().eval(), composer_run['tokens'])
    reference = composer_run['masked_logits']
    # bf16 keeps about 3 significant digits per weight: the logits move by a fraction of a percent overall
    # (an element-wise bound trips on the odd logit whose rounding errors add up); a wrong fold or slice
    # moves them by tens of percent
    relative = float((reloaded - reference).norm() / reference.norm())
    assert relative < 0.02, relative
    assert (reloaded.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


@pytest.fixture
def checkpoint_state(composer_run):
    return torch.load(composer_run['checkpoint'], map_location='cpu', weights_only=False)


def test_checkpoint_without_masks_is_refused(checkpoint_state, tmp_path):
    from drp_foundry.export import ExportError, export_checkpoint

    model_state = checkpoint_state['state']['model']
    for key in [key for key in model_state if key.startswith('model.drp_masks.')]:
        del model_state[key]
    path = tmp_path / 'no_masks.pt'
    torch.save(checkpoint_state, path)
    with pytest.raises(ExportError, match=r"no_masks.pt carries no pruning masks \(no key 'model.drp_masks"):
        export_checkpoint(path, tmp_path / 'out')
    assert not (tmp_path / 'out').exists() and leftovers(tmp_path) == []


def test_masks_that_do_not_fit_the_model_are_refused(checkpoint_state, tmp_path):
    from drp_foundry.export import ExportError, export_checkpoint

    config = checkpoint_state['state']['integrations']['huggingface']['model']['config']['content']
    config['intermediate_size'] = 192  # the stored model is not the one the masks were learned on
    path = tmp_path / 'other_model.pt'
    torch.save(checkpoint_state, path)
    with pytest.raises(ExportError, match=r"other_model.pt: the masks in 'model.drp_masks._extra_state' do not fit"):
        export_checkpoint(path, tmp_path / 'out')
    assert not (tmp_path / 'out').exists() and leftovers(tmp_path) == []


def test_mask_tensor_of_wrong_shape_is_refused(checkpoint_state, tmp_path):
    from drp_foundry.export import ExportError, export_checkpoint

    checkpoint_state['state']['model']['model.drp_masks.log_alpha_head'] = torch.zeros(4, 3)
    path = tmp_path / 'bad_mask.pt'
    torch.save(checkpoint_state, path)
    with pytest.raises(ExportError, match=r'(?s)bad_mask.pt: its weights do not match.*size mismatch for drp_masks.log_alpha_head'):
        export_checkpoint(path, tmp_path / 'out')


def test_failure_after_staging_leaves_nothing_behind(checkpoint_state, tmp_path):
    from drp_foundry.export import ExportError, export_checkpoint

    checkpoint_state['state']['integrations']['huggingface']['tokenizer'] = {}
    path = tmp_path / 'no_tokenizer.pt'
    torch.save(checkpoint_state, path)
    with pytest.raises(ExportError, match=r'no_tokenizer.pt stores no tokenizer; pass --tokenizer DIR'):
        export_checkpoint(path, tmp_path / 'out')
    assert not (tmp_path / 'out').exists() and leftovers(tmp_path) == []


def test_non_empty_output_needs_overwrite(composer_run, tmp_path, tiny_tokenizer_dir, capsys):
    from drp_foundry.commands.export import main

    out_dir = tmp_path / 'pruned'
    out_dir.mkdir()
    (out_dir / 'old.txt').write_text('previous export')
    assert main([str(composer_run['checkpoint']), str(out_dir)]) == 2
    assert 'exists and is not empty; pass --overwrite' in capsys.readouterr().err
    # --overwrite replaces only an earlier export (pruning_report.json), never a folder of something else
    assert main([str(composer_run['checkpoint']), str(out_dir), '--overwrite']) == 2
    assert 'is not an earlier export (no pruning_report.json)' in capsys.readouterr().err
    assert (out_dir / 'old.txt').read_text() == 'previous export'
    (out_dir / 'pruning_report.json').write_text('{}')
    # an earlier export, but with a file it did not write (issue 28): refused, listed, kept
    assert main([str(composer_run['checkpoint']), str(out_dir), '--overwrite']) == 2
    assert "did not write: ['old.txt']" in capsys.readouterr().err
    assert (out_dir / 'old.txt').read_text() == 'previous export'
    (out_dir / 'old.txt').unlink()

    assert main([str(composer_run['checkpoint']), str(out_dir), '--overwrite', '--tokenizer',
                 str(tiny_tokenizer_dir)]) == 0
    assert (out_dir / 'config.json').is_file()
    assert leftovers(tmp_path) == []
    assert main([str(composer_run['checkpoint']), str(out_dir), '--overwrite']) == 0  # re-export over its own output


@pytest.mark.parametrize('overwrite', [False, True])
def test_export_into_the_run_folder_is_refused_and_deletes_nothing(composer_run, tmp_path, overwrite, capsys):
    import shutil

    from drp_foundry.commands.export import main

    run = tmp_path / 'run'
    shutil.copytree(composer_run['root'] / 'checkpoints', run / 'checkpoints')
    (run / 'metrics.jsonl').write_text('{"step": 1}\n')
    (run / 'pruning_report.json').write_text('{}')  # even a folder that looks like an export
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob('*'))
    flag = ['--overwrite'] if overwrite else []
    assert main([str(run / 'checkpoints' / 'ep0-ba2-rank0.pt'), str(run)] + flag) == 2
    assert 'holds the input' in capsys.readouterr().err
    other = tmp_path / 'elsewhere.pt'
    shutil.copy(run / 'checkpoints' / 'ep0-ba2-rank0.pt', other)
    assert main([str(other), str(run)] + flag) == 2
    assert 'holds a checkpoint' in capsys.readouterr().err and 'ep0-ba2-rank0.pt' in ''.join(before)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob('*')) == before


def test_output_holding_the_tokenizer_is_refused(composer_run, tmp_path, tiny_tokenizer_dir, capsys):
    import shutil

    from drp_foundry.commands.export import main

    out_dir = tmp_path / 'pruned'
    shutil.copytree(tiny_tokenizer_dir, out_dir / 'tok')
    assert main([str(composer_run['checkpoint']), str(out_dir), '--overwrite', '--tokenizer', str(out_dir / 'tok')]) == 2
    assert 'holds the input' in capsys.readouterr().err and (out_dir / 'tok').is_dir()


def test_missing_checkpoint_and_non_checkpoint_folder_are_refused(tmp_path):
    from drp_foundry.export import ExportError, export_checkpoint

    with pytest.raises(ExportError, match=r'missing.pt does not exist'):
        export_checkpoint(tmp_path / 'missing.pt', tmp_path / 'out')
    (tmp_path / 'folder').mkdir()
    with pytest.raises(ExportError, match=r'holds no .metadata file'):
        export_checkpoint(tmp_path / 'folder', tmp_path / 'out')
