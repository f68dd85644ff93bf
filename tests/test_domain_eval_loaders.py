"""``eval_loader: {name: drp_domain_evals}``: one eval loader per domain, labelled with it (``drp_text``:
LLM-Foundry's ``text`` loader built under the streaming shm lock), built by LLM-Foundry's own config
transforms and evaluator builder (a stock ``train.py`` included)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from drp_foundry.composer.domain_eval_loaders import (
    DomainEvalsError,
    domain_eval_loaders,
    expand_domain_eval_loaders,
)

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ['code', 'prose', 'web']
SEQ_LEN = 16
VOCAB = 512  # conftest's tiny tokenizer


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> Path:
    """``<root>/<domain>/{train,eval}/`` MDS token shards; each domain's tokens lie in its own id range,
    so a batch shows which folder it came from."""
    from streaming import MDSWriter

    root = tmp_path_factory.mktemp('mds')
    rng = np.random.default_rng(0)
    for i, domain in enumerate(DOMAINS):
        low = 10 + i * 150
        for split, count in (('train', 24), ('eval', 4)):
            with MDSWriter(out=str(root / domain / split), columns={'tokens': 'ndarray:int32'}) as writer:
                for _ in range(count):
                    writer.write({'tokens': rng.integers(low, low + 150, size=SEQ_LEN, dtype=np.int32)})
    return root


def stock_yaml(data_root: Path, tokenizer_dir: Path, model_dir: Path, save_folder: Path) -> dict:
    """A plain LLM-Foundry config (its `text` train loader, no drp-foundry component) plus the one entry."""
    return {
        'max_seq_len': SEQ_LEN, 'seed': 3, 'run_name': 'stock',
        'model': {'name': 'hf_causal_lm', 'pretrained_model_name_or_path': str(model_dir), 'pretrained': False,
                  'attn_implementation': 'eager'},
        'tokenizer': {'name': str(tokenizer_dir), 'kwargs': {'model_max_length': SEQ_LEN}},
        'train_loader': {'name': 'text', 'drop_last': True, 'num_workers': 0, 'prefetch_factor': None,
                         'persistent_workers': False,
                         'dataset': {'streams': {d: {'local': str(data_root / d / 'train')} for d in DOMAINS},
                                     'shuffle': True, 'max_seq_len': SEQ_LEN}},
        'eval_loader': {'name': 'drp_domain_evals', 'data_root': str(data_root), 'domains': DOMAINS},
        'optimizer': {'name': 'decoupled_adamw', 'lr': 1e-3},
        'scheduler': {'name': 'constant_with_warmup', 't_warmup': '0ba'},
        'max_duration': '2ba', 'eval_interval': '2ba', 'eval_first': False,
        'global_train_batch_size': 4, 'device_train_microbatch_size': 4, 'device_eval_batch_size': 2,
        'precision': 'fp32', 'progress_bar': False, 'log_to_console': True, 'console_log_interval': '1ba',
        'save_folder': str(save_folder), 'save_interval': '2ba',
    }


def test_a_stock_yaml_with_the_entry_builds_one_evaluator_per_domain_through_foundry(data_root, tiny_tokenizer,
                                                                                       tiny_tokenizer_dir, tmp_path):
    from llmfoundry.utils.builders import build_evaluators
    from llmfoundry.utils.config_utils import TRAIN_CONFIG_KEYS, TrainConfig, make_dataclass_and_log_config
    from omegaconf import OmegaConf as om

    cfg = om.create(stock_yaml(data_root, tiny_tokenizer_dir, tmp_path / 'model', tmp_path / 'ckpt'))
    logged_cfg, train_cfg = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms='all')
    assert train_cfg.eval_loader is None and [e['label'] for e in train_cfg.eval_loaders] == DOMAINS
    assert [e['label'] for e in logged_cfg['eval_loaders']] == DOMAINS  # the run's logged config shows the list
    evaluators, _, _ = build_evaluators(copy.deepcopy(train_cfg.eval_loaders), None, None, tokenizer=tiny_tokenizer,
                                        device_eval_batch_size=2, icl_seq_len=SEQ_LEN, icl_subset_num_batches=None)
    assert [e.label for e in evaluators] == [f'eval/{d}' for d in DOMAINS]
    for i, evaluator in enumerate(evaluators):
        batches = list(evaluator.dataloader.dataloader)
        assert sum(len(b['input_ids']) for b in batches) == 4  # the whole eval split, in order, nothing dropped
        ids = np.concatenate([b['input_ids'].numpy().ravel() for b in batches])
        assert ids.min() >= 10 + i * 150 and ids.max() < 10 + (i + 1) * 150, f'{DOMAINS[i]} read another domain'


def test_defaults_come_from_the_multidomain_train_loader_and_other_keys_reach_every_loader():
    cfg = {'max_seq_len': 99,
           'train_loader': {'name': 'drp_multidomain',
                            'dataset': {'data_root': '/d', 'domains': ['a', 'b'], 'max_seq_len': 64,
                                        'proportions': [0.5, 0.5], 'remote_root': 's3://bucket/mds'}},
           'eval_loaders': [{'label': 'other', 'name': 'text', 'dataset': {'local': '/x'}},
                            {'name': 'drp_domain_evals', 'num_workers': 2, 'persistent_workers': True,
                             'dataset': {'eos_token_id': 0}}]}
    out = expand_domain_eval_loaders(copy.deepcopy(cfg))
    assert [e['label'] for e in out['eval_loaders']] == ['other', 'a', 'b']  # in place, in domain order
    a = out['eval_loaders'][1]
    assert a == {'label': 'a', 'name': 'drp_text', 'drop_last': False, 'num_workers': 2, 'prefetch_factor': None,
                 'persistent_workers': True, 'pin_memory': torch.cuda.is_available(),  # pinning only helps a GPU copy
                 'dataset': {'local': '/d/a', 'split': 'eval', 'shuffle': False, 'max_seq_len': 64,
                             'remote': 's3://bucket/mds/a', 'eos_token_id': 0}}
    assert cfg['eval_loaders'][1]['name'] == 'drp_domain_evals'  # the caller's config is not modified
    pinned = expand_domain_eval_loaders({**copy.deepcopy(cfg), 'eval_loaders': [{'name': 'drp_domain_evals', 'pin_memory': True}]})
    assert all(loader['pin_memory'] is True for loader in pinned['eval_loaders'])  # a user's value wins
    no_entry = {'eval_loaders': [{'label': 'x', 'name': 'text'}]}
    assert expand_domain_eval_loaders(no_entry) is no_entry


def test_mistakes_are_refused_with_the_key_and_the_fix(data_root):
    text_train = {'train_loader': {'name': 'text', 'dataset': {}}, 'max_seq_len': SEQ_LEN}
    with pytest.raises(DomainEvalsError, match=r'eval_loader\.data_root: required \(the train loader is not '):
        expand_domain_eval_loaders({**text_train, 'eval_loader': {'name': 'drp_domain_evals', 'domains': ['a']}})
    with pytest.raises(DomainEvalsError, match=r'eval_loader\.domains: a non-empty list'):
        expand_domain_eval_loaders({**text_train, 'eval_loader': {'name': 'drp_domain_evals',
                                                                  'data_root': str(data_root)}})
    with pytest.raises(DomainEvalsError, match=r"eval_loader\.label: not used"):
        domain_eval_loaders({'name': 'drp_domain_evals', 'label': 'x', 'data_root': str(data_root),
                             'domains': DOMAINS}, text_train)
    with pytest.raises(DomainEvalsError, match=r"no MDS eval split for domain 'poetry' at .*poetry/eval"):
        domain_eval_loaders({'name': 'drp_domain_evals', 'data_root': str(data_root), 'domains': ['poetry']},
                            text_train)
    with pytest.raises(DomainEvalsError, match=r"labelled \['code'\] appear twice"):
        expand_domain_eval_loaders({**text_train, 'eval_loaders': [
            {'name': 'drp_domain_evals', 'data_root': str(data_root), 'domains': DOMAINS},
            {'label': 'code', 'name': 'text', 'dataset': {}}]})


def test_the_preflight_check_expands_the_entry_and_checks_the_loaders_it_makes(data_root, tmp_path):
    from omegaconf import OmegaConf as om

    from drp_foundry.composer.config_checks import ConfigError, check_train_config

    cfg = stock_yaml(data_root, tmp_path, tmp_path, tmp_path)
    cfg['eval_loader']['num_wokers'] = 1
    with pytest.raises(ConfigError, match=r"eval_loaders\[0\]\.num_wokers: unknown key .*'num_workers'"):
        check_train_config(om.create(cfg))
    cfg['eval_loader'].pop('num_wokers')
    cfg['eval_loader']['domains'] = ['code', 'poetry']
    with pytest.raises(ConfigError, match=r"eval_loaders\[1\]\.dataset\.local: no MDS dataset at .*poetry/eval"):
        check_train_config(om.create(cfg))


def test_a_train_script_without_config_transforms_gets_the_explanation(tiny_tokenizer):
    from llmfoundry.data.dataloader import build_dataloader

    with pytest.raises(DomainEvalsError, match='reached the dataloader builder unexpanded'):
        build_dataloader({'name': 'drp_domain_evals'}, tiny_tokenizer, 2)


@pytest.mark.slow
def test_stock_foundry_train_entry_evaluates_every_domain(data_root, tiny_tokenizer_dir, tmp_path):
    """LLM-Foundry's ``train_from_yaml`` (what its scripts/train/train.py runs) in a fresh interpreter that
    never imports drp_foundry itself: the transform arrives through the entry point alone."""
    from conftest import tiny_llama_config

    model_dir = tmp_path / 'model'
    tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=2).save_pretrained(model_dir)
    yaml_path = tmp_path / 'stock.yaml'
    yaml_path.write_text(json.dumps(stock_yaml(data_root, tiny_tokenizer_dir, model_dir, tmp_path / 'ckpt')))
    script = ('import sys\n'
              'from llmfoundry.command_utils import train_from_yaml\n'
              f'trainer = train_from_yaml({str(yaml_path)!r}, [])\n'
              'print("LABELS", [e.label for e in trainer.state.evaluators])\n'
              'print("DRP_MODULES", sorted(m for m in sys.modules if m.startswith("drp_foundry")))\n')
    # from the repository root, as a user's `pip install -e .` checkout: its metadata declares the entry points
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"LABELS {[f'eval/{d}' for d in DOMAINS]}" in log
    for domain in DOMAINS:
        assert f'metrics/eval/{domain}/LanguageCrossEntropy' in log
    # only the transform module (through the entry point; it also builds the drp_text loaders), the pure
    # domain-name check it shares with the dataset's validation and the shm lock were imported; no other
    # drp_foundry code ran (no pruning, scheduler or callbacks)
    expected = ['drp_foundry', 'drp_foundry.composer', 'drp_foundry.composer.domain_eval_loaders', 'drp_foundry.data',
                'drp_foundry.data.multidomain_config', 'drp_foundry.data.shm_lock', 'drp_foundry.mixtures']
    assert f'DRP_MODULES {expected}' in log
