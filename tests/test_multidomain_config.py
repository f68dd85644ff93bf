"""One validation of the ``drp_multidomain`` section: the pre-flight check and the builder refuse the same
configs with the same message; and the simplex helper every mixture check goes through."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from omegaconf import OmegaConf as om
from test_config_checks import PRUNE, SMOLLM2, write_fake_data_root

from drp_foundry.composer.config_checks import ConfigError, check_train_config, load_train_config
from drp_foundry.data.multidomain_config import validate_multidomain_config
from drp_foundry.mixtures import domain_mixture, per_domain, simplex

DOMAINS = ['arxiv', 'book', 'c4-rp', 'cc', 'github', 'stackexchange', 'wiki']


@pytest.fixture
def data_root(tmp_path):
    return write_fake_data_root(tmp_path / 'data', SMOLLM2, copy_tokenizer=False)


def _dataset(**changes):
    def mutate(loader: dict, root: Path) -> None:
        for key, value in changes.items():
            if value is _DELETE:
                loader['dataset'].pop(key)
            else:
                loader['dataset'][key] = value
    return mutate


def _loader(**changes):
    def mutate(loader: dict, root: Path) -> None:
        loader.update(changes)
    return mutate


def _empty_domain(loader: dict, root: Path) -> None:
    (root / 'wiki' / 'train' / 'index.json').write_text(json.dumps({'version': 2, 'shards': []}))


_DELETE = object()
# (name, change to the train loader of yamls/demo/smollm2_prune.yaml, part of the message)
CASES: list[tuple[str, Callable[[dict, Path], None], str]] = [
    ('proportions-sum', _dataset(proportions=[0.5, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1]), 'proportions sum to 1.5, not 1'),
    ('proportions-count', _dataset(proportions=[0.5, 0.5]), 'got 2 proportions for 7 domains'),
    ('proportions-negative', _dataset(proportions=[0.5, -0.1, 0.1, 0.2, 0.1, 0.1, 0.1]), 'must be >= 0'),
    ('proportions-mapping', _dataset(proportions={'arxiv': 0.5, 'wikipedia': 0.5}), "unknown: ['wikipedia']"),
    ('proportions-missing', _dataset(proportions=_DELETE), 'train_loader.dataset.proportions is required'),
    ('key-typo', _dataset(shuffle_sed=3), "train_loader.dataset.shuffle_sed: unknown key for drp_multidomain. "
                                         "Did you mean 'shuffle_seed'"),
    ('domains-twice', _dataset(domains=DOMAINS[:6] + ['wiki', 'wiki'], proportions=[0.125] * 8),
     "train_loader.dataset.domains: domain names must be unique; ['wiki']"),
    ('domains-empty', _dataset(domains=[]), 'train_loader.dataset.domains: a non-empty list of domain names'),
    ('max-seq-len', _dataset(max_seq_len=0), 'train_loader.dataset.max_seq_len: must be >= 1'),
    ('streams-unknown-domain', _dataset(streams={'poetry': {'local': '/x'}}),
     "train_loader.dataset.streams names unknown domains ['poetry']"),
    ('streams-key', _dataset(streams={'wiki': {'locale': '/x'}}),
     "train_loader.dataset.streams.wiki: unknown keys ['locale']"),
    ('no-location', _dataset(data_root=None), "domain 'arxiv' has no location"),
    ('shuffle-algo', _dataset(shuffle_algo='blocks'), "train_loader.dataset.shuffle_algo: must be one of"),
    ('block-shards', _dataset(shuffle_block_shards=0), 'train_loader.dataset.shuffle_block_shards: must be >= 1'),
    ('token-encoding', _dataset(token_encoding_type='int31'), 'train_loader.dataset.token_encoding_type'),
    ('update-lag', _dataset(update_lag_batches=1), 'update_lag_batches=1 is below the batches that can be in flight'
                                                  ' (num_workers * prefetch_factor = 2)'),
    ('prefetch-not-bool', _dataset(prefetch='yes'), 'train_loader.dataset.prefetch: expected true or false'),
    ('drop-last', _loader(drop_last=False), 'train_loader.drop_last must be true'),
    ('missing-folder', lambda loader, root: shutil.rmtree(root / 'github' / 'train'),
     "domain 'github' has no MDS dataset at"),
    ('empty-domain', _empty_domain, "domains ['wiki'] have no samples"),
]


@pytest.mark.parametrize('name, change, message', CASES, ids=[case[0] for case in CASES])
def test_preflight_refuses_with_the_builders_message(data_root, name, change, message):
    from drp_foundry.composer.multidomain_dataloader import build_multidomain_dataloader

    raw = om.to_container(load_train_config(PRUNE, [f'variables.data_root={data_root}']), resolve=True)
    loader = copy.deepcopy(raw['train_loader'])
    change(loader, data_root)
    raw['train_loader'] = loader
    with pytest.raises(ConfigError) as preflight:
        check_train_config(om.create(raw))
    assert message in str(preflight.value)

    kwargs = {key: value for key, value in loader.items() if key != 'name'}
    with pytest.raises(ValueError) as builder:
        # the tokenizer is only used after the section is checked
        build_multidomain_dataloader(object(), 4, **kwargs)
    assert str(builder.value) == str(preflight.value)


def test_good_section_is_normalised(data_root):
    settings = validate_multidomain_config({'data_root': str(data_root), 'domains': DOMAINS[:2],
                                            'proportions': {'book': 0.6, 'arxiv': 0.3999}, 'max_seq_len': 8,
                                            'streams': {'book': {'split': 'eval'}}, 'eos_token_id': 0})
    assert settings.domains == ['arxiv', 'book']
    np.testing.assert_allclose(settings.proportions, [0.3999 / 0.9999, 0.6 / 0.9999])
    assert settings.streams[1] == {'local': str(data_root / 'book'), 'remote': None, 'split': 'eval'}
    assert settings.update_lag_batches == 'auto' and settings.collator_kwargs == {'eos_token_id': 0}
    remote = validate_multidomain_config({'data_root': '/nowhere', 'remote_root': 's3://b/x', 'domains': ['a'],
                                          'proportions': [1.0], 'max_seq_len': 8})
    assert remote.streams == [{'local': '/nowhere/a', 'remote': 's3://b/x/a', 'split': 'train'}]  # no folder needed


def test_zero_proportion_is_refused_before_training_with_the_schedulers_message(data_root):
    """The dataset section allows a zero share (a domain evaluated, not trained on); the scheduler does not, and
    the pre-flight check says so with the message its callback gives at FIT_START, after the model loaded."""
    from drp_foundry.composer.dynamic_loading import DynamicLoading

    zero = [0.0, 0.045, 0.175, 0.67, 0.045, 0.02, 0.045]
    cfg = load_train_config(PRUNE, [f'variables.data_root={data_root}', f'train_loader.dataset.proportions={zero}'])
    with pytest.raises(ConfigError) as preflight:
        check_train_config(cfg)
    policy = om.to_container(cfg.callbacks.drp_dynamic_loading.policy, resolve=True)
    with pytest.raises(ValueError) as at_fit_start:  # DynamicLoading._setup with the dataset's proportions
        DynamicLoading(policy=policy)._build_policy(DOMAINS, domain_mixture(zero, DOMAINS, 'p'))
    assert str(at_fit_start.value) in str(preflight.value) and 'must be > 0' in str(preflight.value)
    # without the scheduler the section is valid, in the pre-flight check and in the builder alike
    settings = validate_multidomain_config(om.to_container(cfg.train_loader.dataset, resolve=True))
    assert settings.proportions[0] == 0.0
    raw = om.to_container(cfg, resolve=True)
    del raw['callbacks']['drp_dynamic_loading']
    check_train_config(om.create(raw))


def test_reference_ratio_unlike_the_dataset_is_refused_before_training(data_root):
    from drp_foundry.composer.dynamic_loading import check_reference_ratio

    ratio = [1 / 7] * 7
    with pytest.raises(ConfigError) as preflight:
        check_train_config(load_train_config(PRUNE, [f'variables.data_root={data_root}',
                                                     f'callbacks.drp_dynamic_loading.reference_ratio={ratio}']))
    dataset = [0.025, 0.045, 0.15, 0.67, 0.045, 0.02, 0.045]  # the recipe's proportions
    with pytest.raises(ValueError) as at_fit_start:  # what the callback raises at FIT_START, after the model loaded
        check_reference_ratio(domain_mixture(ratio, DOMAINS, 'r', positive=True), domain_mixture(dataset, DOMAINS, 'p'))
    assert str(preflight.value) == str(at_fit_start.value)
    assert 'differs from the train dataset' in str(preflight.value)


@pytest.mark.parametrize('values, kwargs, message', [
    ([0.5, 0.6], {}, 'x: proportions sum to 1.1, not 1'),
    ([0.5, float('inf')], {}, 'x: proportions must be finite'),
    ([1.5, -0.5], {}, 'x: proportions must be >= 0'),
    ([0.0, 1.0], {'positive': True}, 'x: proportions must be > 0'),
    ([0.0, 0.0], {}, 'x: proportions are all zero'),
    ([], {}, 'x: proportions must be a non-empty list'),
    ([0.5, 0.5 + 2e-6], {'tol': 1e-6}, 'x: proportions sum to 1.000002, not 1'),
])
def test_simplex_refuses_naming_the_key(values, kwargs, message):
    with pytest.raises(ValueError, match='^' + message.split(':')[0]) as error:
        simplex(values, 'x', **kwargs)
    assert message in str(error.value)


def test_simplex_renormalises_rounding_and_orders_mappings():
    q = simplex([0.2, 0.3, 0.4999], 'q')
    assert q.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(simplex([0.0, 1.0], 'q'), [0.0, 1.0])  # zeros allowed unless positive
    np.testing.assert_allclose(domain_mixture({'b': 0.75, 'a': 0.25}, ['a', 'b'], 'q'), [0.25, 0.75])
    np.testing.assert_allclose(per_domain({'b': 2.5, 'a': 1.0}, ['a', 'b'], 'l', what='losses'), [1.0, 2.5])
    with pytest.raises(ValueError, match=r"^l: the mapping must name exactly .*missing: \['b'\]"):
        per_domain({'a': 1.0}, ['a', 'b'], 'l')
    with pytest.raises(ValueError, match=r'^l: got 3 losses for 2 domains .*one entry per domain \(2\)'):
        per_domain([1.0, 2.0, 3.0], ['a', 'b'], 'l', what='losses')
