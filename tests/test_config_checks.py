"""Pre-flight config checks: typos and missing data are refused before anything is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from drp_foundry.composer.config_checks import ConfigError, check_train_config, load_train_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / 'yamls' / 'demo' / 'tiny_llama.yaml'


DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']


FAKE_INDEX = '{"version": 2, "shards": [{"samples": 4}]}'  # an MDS index listing one shard of 4 samples


def write_fake_data_root(root: Path, tokenizer_dir: Path, max_seq_len: int = 128, domains=DOMAINS,
                         copy_tokenizer: bool = True) -> Path:
    """Fake MDS folders (index.json only), the tokenizer and a data_prep manifest: enough for the checks."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from drp_foundry.data.manifest import tokenizer_identity

    for domain in domains:
        for split in ['train', 'eval']:
            (root / domain / split).mkdir(parents=True)
            (root / domain / split / 'index.json').write_text(FAKE_INDEX)
    if copy_tokenizer:
        shutil.copytree(tokenizer_dir, root / 'tokenizer')
    manifest = {'fingerprint': 'x', 'settings': {'max_seq_len': max_seq_len}, 'tokenizer': 'trained:512',
                'tokenizer_identity': tokenizer_identity(AutoTokenizer.from_pretrained(str(tokenizer_dir))), 'vocab_size': 512,
                'domains': {d: {'train_samples': 1, 'eval_samples': 1} for d in domains}}
    (root / 'manifest.json').write_text(json.dumps(manifest))
    return root


@pytest.fixture
def data_root(tmp_path, tiny_tokenizer_dir):
    return write_fake_data_root(tmp_path / 'data', tiny_tokenizer_dir)


def _cfg(data_root, *overrides):
    return load_train_config(TINY, [f'variables.data_root={data_root}', *overrides])


def test_demo_config_passes(data_root):
    check_train_config(_cfg(data_root))


def test_top_level_typo_suggests_the_key(data_root):
    with pytest.raises(ConfigError, match=r"max_durration: unknown top-level key\. Did you mean 'max_duration'"):
        check_train_config(_cfg(data_root, 'max_durration=10ba'))


def test_component_argument_typo_names_the_key(data_root):
    with pytest.raises(ConfigError, match=r"callbacks\.drp_domain_eval_loss\.domain: unknown key.*'domains'"):
        check_train_config(_cfg(data_root, 'callbacks.drp_domain_eval_loss.domain=[wiki]'))


def test_unregistered_component_is_named(data_root):
    with pytest.raises(ConfigError, match=r"'drp_domain_eval_los' is not registered.*drp_domain_eval_loss"):
        check_train_config(_cfg(data_root, 'callbacks.drp_domain_eval_los={}'))


def test_missing_domain_folder_names_the_path(data_root):
    import shutil

    shutil.rmtree(data_root / 'wiki')
    with pytest.raises(ConfigError, match=r'train_loader\.dataset\.streams\.wiki\.local: no MDS dataset at .*wiki/train'):
        check_train_config(_cfg(data_root))


@pytest.mark.slow
def test_train_script_exits_with_the_message(data_root):
    result = subprocess.run([sys.executable, str(REPO / 'train.py'), str(TINY), f'variables.data_root={data_root}',
                             'max_durration=3ba'], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0
    assert 'max_durration: unknown top-level key' in result.stderr
    assert 'Building' not in result.stderr + result.stdout  # stopped before LLM-Foundry built anything


PRUNE = REPO / 'yamls' / 'demo' / 'smollm2_prune.yaml'


SMOLLM2 = REPO / 'models' / 'smollm2-135m'


@pytest.fixture
def prune_data_root(tmp_path):
    """Fake data root tokenised (as its manifest says) with SmolLM2's tokenizer, as the prune demo expects."""
    return write_fake_data_root(tmp_path / 'prune-data', SMOLLM2, copy_tokenizer=False)


def _prune_cfg(data_root, *overrides):
    return load_train_config(PRUNE, [f'variables.data_root={data_root}', *overrides])


def test_multidomain_loader_checks_keys_proportions_and_folders(prune_data_root):
    data_root = prune_data_root
    check_train_config(_prune_cfg(data_root))
    with pytest.raises(ConfigError, match=r"train_loader\.dataset\.shuffle_sed: unknown key.*'shuffle_seed'"):
        check_train_config(_prune_cfg(data_root, 'train_loader.dataset.shuffle_sed=3'))
    with pytest.raises(ConfigError, match=r'train_loader\.dataset\.proportions'):
        check_train_config(_prune_cfg(data_root, 'train_loader.dataset.proportions=[0.5,0.5]'))
    import shutil

    shutil.rmtree(data_root / 'github' / 'train')
    with pytest.raises(ConfigError, match=r"domain 'github' has no MDS dataset at .*github/train"):
        check_train_config(_prune_cfg(data_root))


def test_callback_policy_key_typo_is_caught_before_training(prune_data_root):
    data_root = prune_data_root
    with pytest.raises(ConfigError, match=r"drp_dynamic_loading: .*unknown keys \['rhoo'\].*'rho' "
                                          r"\(a policy key: inside `policy`\)"):
        check_train_config(_prune_cfg(data_root, 'callbacks.drp_dynamic_loading.rhoo=0.2'))
    with pytest.raises(ConfigError, match=r"drp_dynamic_loading\.policy: \['rhoo'\] are not keys of policy "
                                          r"'drpruning'"):
        check_train_config(_prune_cfg(data_root, 'callbacks.drp_dynamic_loading.policy.rhoo=0.2'))
    with pytest.raises(ConfigError, match=r'write `policy: \{name: drpruning, rho: 0.2\}`'):
        check_train_config(_prune_cfg(data_root, 'callbacks.drp_dynamic_loading.rho=0.2'))
    with pytest.raises(ConfigError, match=r"algorithms\.drp_mask_learner\.mask_learning_rate: unknown key"):
        check_train_config(_prune_cfg(data_root, 'algorithms.drp_mask_learner.mask_learning_rate=1.0'))


def test_pruning_with_reentrant_activation_checkpointing_is_refused(prune_data_root):
    data_root = prune_data_root
    with pytest.raises(ConfigError, match=r'activation_checkpointing_reentrant: set it to false'):
        check_train_config(_prune_cfg(data_root, 'fsdp_config.activation_checkpointing=true'))
    check_train_config(_prune_cfg(data_root, 'fsdp_config.activation_checkpointing=true',
                                  'fsdp_config.activation_checkpointing_reentrant=false'))


def test_fsdp2_checkpointing_needs_no_reentrant_key(prune_data_root, monkeypatch):
    """Composer's FSDP2 always checkpoints non-reentrant and ignores the v1 key: nothing to ask for."""
    monkeypatch.setenv('FSDP_VERSION', '2')
    check_train_config(_prune_cfg(prune_data_root, 'fsdp_config.activation_checkpointing=true'))


def test_a_resaved_copy_of_the_data_tokenizer_is_accepted(data_root, tmp_path):
    """An export re-saves the tokenizer (other file bytes); the check compares vocabulary, merges and EOS."""
    from transformers import AutoTokenizer

    copy = tmp_path / 'exported'
    tok = AutoTokenizer.from_pretrained(str(data_root / 'tokenizer'))
    tok.model_max_length = 77
    tok.save_pretrained(str(copy))
    check_train_config(_cfg(data_root, f'tokenizer.name={copy}'))
    tok.add_tokens(['<|new|>'])
    tok.save_pretrained(str(copy))
    with pytest.raises(ConfigError, match=r'tokenizer\.name: .*exported is not the tokenizer'):
        check_train_config(_cfg(data_root, f'tokenizer.name={copy}'))


def test_model_dropout_is_warned_about(data_root, tmp_path, caplog):
    import json

    config = json.loads((REPO / 'yamls/demo/models/tiny-llama/config.json').read_text())
    model = tmp_path / 'dropout-model'
    model.mkdir()
    (model / 'config.json').write_text(json.dumps({**config, 'attention_dropout': 0.1}))
    check_train_config(_cfg(data_root, f'variables.model_dir={model}'))
    assert "model config has dropout {'attention_dropout': 0.1}" in caplog.text
    assert 'not be bitwise identical' in caplog.text
