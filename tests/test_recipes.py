"""Every shipped YAML (``yamls/**/*.yaml``) builds everything that needs no weights and no GPU.

For each recipe, on a temporary DATA_ROOT of tiny MDS shards (one per domain and split the
YAML names) and a tiny tokenizer, with small batch / sequence overrides, the test goes
through what ``train.py`` does before it loads the model: drp-foundry's pre-flight
``check_train_config``, LLM-Foundry's config dataclass and transforms, init-device/FSDP
processing, tokenizer, scheduler, optimizer, loggers, callbacks and algorithms from the
registries, the train dataloader and the per-domain evaluators. Then it checks what a GPU
run would only find out later: the pruning target against the source architecture (built
from its config, without weights), the FSDP settings the masks need, the data scheduler
against the train dataset's domains and the eval loaders, and the multilingual initial
ratio against the temperature-smoothed data sizes. New recipes are picked up by the glob.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, release_dead_streaming_shm

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / 'yamls').rglob('*.yaml'))
SEQ_LEN = 32
SAMPLES_PER_SPLIT = 6
TINY_VOCAB = 512  # conftest's tiny tokenizer


def _llama2_7b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)


def _qwen2_7b():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)


def _smollm2_135m():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


# Source models named by recipes, built from their published sizes (no weights, no hub), with
# the published parameter count they must reproduce. A local folder with a config.json wins.
KNOWN_SOURCES = {
    'meta-llama/Llama-2-7b-hf': (_llama2_7b, 6_738_415_616),
    'Qwen/Qwen2-7B': (_qwen2_7b, 7_615_616_512),
    'models/smollm2-135m': (_smollm2_135m, 134_515_008),  # `make setup` converts it into this folder
}


def _recipe_id(path: Path) -> str:
    return str(path.relative_to(REPO / 'yamls'))


def test_recipes_are_found():
    names = {_recipe_id(p) for p in RECIPES}
    expected = {'prune_1.3b.yaml', 'prune_2.7b.yaml', 'continue_1.3b.yaml', 'continue_2.7b.yaml',
                'prune_qwen2_1.8b.yaml', 'continue_qwen2_1.8b.yaml', 'demo/smollm2_prune.yaml',
                'demo/smollm2_continue.yaml'}
    assert expected <= names, f'missing recipes: {sorted(expected - names)}'


def source_hf_config(name: str):
    """The HF config of a recipe's source model: its local config.json, else the known sizes."""
    local = Path(name) if Path(name).is_absolute() else REPO / name
    if (local / 'config.json').is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(local))
    if name not in KNOWN_SOURCES:
        pytest.fail(f'no architecture known for source model {name!r}: add it to KNOWN_SOURCES in {__file__}')
    return KNOWN_SOURCES[name][0]()


@pytest.mark.parametrize('name', sorted(KNOWN_SOURCES))
def test_known_source_configs_have_the_published_size(name):
    from drp_foundry.pruning.architecture import DecoderArchitecture

    build, published = KNOWN_SOURCES[name]
    assert DecoderArchitecture.from_hf_config(build()).count_parameters() == published


# --- building a recipe -------------------------------------------------------------------------

def _loader_mds_dirs(loader: dict[str, Any]) -> list[Path]:
    """The MDS folders (holding index.json) a train/eval loader config reads."""
    dataset = loader.get('dataset') or {}
    if loader['name'] == 'drp_multidomain':
        overrides = dataset.get('streams') or {}
        dirs = []
        for domain in dataset['domains']:
            stream = overrides.get(domain) or {}
            local = stream.get('local') or os.path.join(dataset['data_root'], domain)
            dirs.append(Path(local) / stream.get('split', dataset.get('split', 'train')))
        return dirs
    streams = list((dataset.get('streams') or {}).values()) or [dataset]
    dirs = []
    for stream in streams:
        split = stream.get('split', dataset.get('split'))
        dirs.append(Path(stream['local']) / split if split else Path(stream['local']))
    return dirs


def _write_tiny_mds(folder: Path, seed: int) -> None:
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(folder), columns={'tokens': 'ndarray:int32'}) as writer:
        for _ in range(SAMPLES_PER_SPLIT):
            writer.write({'tokens': rng.integers(3, TINY_VOCAB, size=SEQ_LEN, dtype=np.int32)})


def _write_manifest(data_root: Path, raw: dict[str, Any], tokenizer_dir: Path) -> None:
    """The data_prep manifest the pre-flight check reads (domains, seq length, tokenizer)."""
    from transformers import AutoTokenizer

    from drp_foundry.data.manifest import tokenizer_identity

    domains = sorted(p.name for p in data_root.iterdir() if p.is_dir())
    manifest = {'fingerprint': 'recipe-test', 'settings': {'max_seq_len': SEQ_LEN}, 'tokenizer': str(tokenizer_dir),
                'tokenizer_identity': tokenizer_identity(AutoTokenizer.from_pretrained(str(tokenizer_dir))), 'vocab_size': TINY_VOCAB,
                'domains': {d: {} for d in domains}}
    (data_root / 'manifest.json').write_text(json.dumps(manifest))


@dataclass
class BuiltRecipe:
    path: Path
    raw: dict[str, Any]  # the resolved YAML (with the test's overrides)
    train_cfg: Any  # LLM-Foundry TrainConfig
    train_spec: Any  # composer DataSpec
    evaluators: list
    callbacks: dict[str, Any] = field(default_factory=dict)
    algorithms: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope='module', params=RECIPES, ids=_recipe_id)
def built(request, tmp_path_factory, tiny_tokenizer_dir) -> Iterator[BuiltRecipe]:
    """Everything ``train.py`` builds before the model, for one recipe."""
    from llmfoundry.command_utils.train import validate_config
    from llmfoundry.data.dataloader import build_dataloader
    from llmfoundry.utils.builders import (
        build_algorithm,
        build_callback,
        build_evaluators,
        build_logger,
        build_optimizer,
        build_scheduler,
        build_tokenizer,
    )
    from llmfoundry.utils.config_utils import (
        TRAIN_CONFIG_KEYS,
        TrainConfig,
        make_dataclass_and_log_config,
        process_init_device,
    )
    from omegaconf import OmegaConf as om

    from drp_foundry.composer.config_checks import check_train_config, load_train_config
    from drp_foundry.composer.domain_eval_loaders import expand_domain_eval_loaders

    recipe: Path = request.param
    workdir = tmp_path_factory.mktemp(re.sub(r'\W', '_', _recipe_id(recipe)))
    data_root = workdir / 'data'
    raw_variables = om.load(recipe).get('variables') or {}
    for key in ('data_root', 'max_seq_len'):
        assert key in raw_variables, (f'{_recipe_id(recipe)}: put {key} under `variables:` (recipes are '
                                      'parametrised through variables.data_root and variables.max_seq_len)')
    overrides = [f'variables.data_root={data_root}', f'variables.max_seq_len={SEQ_LEN}',
                 f'tokenizer.name={tiny_tokenizer_dir}', 'global_train_batch_size=2',
                 'device_train_microbatch_size=2', 'device_eval_batch_size=2', 'train_loader.num_workers=0',
                 'train_loader.prefetch_factor=null', 'train_loader.persistent_workers=false',
                 'train_loader.pin_memory=false']
    cfg = load_train_config(recipe, overrides)
    raw = om.to_container(cfg, resolve=True)
    model_path = (raw.get('model') or {}).get('pretrained_model_name_or_path')
    if model_path and (REPO_ROOT / model_path).is_dir():  # relative to the checkout; the test runs in workdir
        cfg = load_train_config(recipe, overrides + [f'model.pretrained_model_name_or_path={REPO_ROOT / model_path}'])
        raw = om.to_container(cfg, resolve=True)

    # eval_loader: {name: drp_domain_evals} stands for one loader per domain (the folders are written below)
    expanded = expand_domain_eval_loaders(raw, check_folders=False)
    loaders = [raw['train_loader'], *(expanded.get('eval_loaders') or [])]
    for i, folder in enumerate(sorted({d for loader in loaders for d in _loader_mds_dirs(loader)})):
        assert data_root in folder.parents, (f'{_recipe_id(recipe)}: data folder {folder} is not under '
                                             'variables.data_root; derive every data path from it')
        _write_tiny_mds(folder, seed=i)
    _write_manifest(data_root, raw, tiny_tokenizer_dir)

    with pytest.MonkeyPatch.context() as patch:
        # Hub names stand for user-filled paths; nothing is downloaded here, so the offline
        # check of the model path does not apply. Components that write files write in workdir.
        patch.delenv('HF_HUB_OFFLINE', raising=False)
        patch.chdir(workdir)
        check_train_config(cfg)

        logged_cfg, train_cfg = make_dataclass_and_log_config(copy.deepcopy(cfg), TrainConfig, TRAIN_CONFIG_KEYS,
                                                               transforms='all')
        validate_config(train_cfg)
        process_init_device(copy.deepcopy(train_cfg.model), copy.deepcopy(train_cfg.fsdp_config))
        tokenizer = build_tokenizer(train_cfg.tokenizer['name'], train_cfg.tokenizer.get('kwargs', {}))
        scheduler_cfg = dict(train_cfg.scheduler)
        build_scheduler(scheduler_cfg.pop('name'), scheduler_cfg)
        optimizer_cfg = dict(train_cfg.optimizer)
        build_optimizer(torch.nn.Linear(4, 4), optimizer_cfg.pop('name'), optimizer_cfg)
        for name, kwargs in (train_cfg.loggers or {}).items():
            build_logger(str(name), copy.deepcopy(kwargs))
        callbacks = {str(name): build_callback(str(name), copy.deepcopy(kwargs), train_config=logged_cfg)
                     for name, kwargs in (train_cfg.callbacks or {}).items()}
        algorithms = {str(name): build_algorithm(str(name), copy.deepcopy(kwargs))
                      for name, kwargs in (train_cfg.algorithms or {}).items()}
        train_spec = build_dataloader(copy.deepcopy(train_cfg.train_loader), tokenizer,
                                      train_cfg.device_train_batch_size)
        eval_config = train_cfg.eval_loader if train_cfg.eval_loader is not None else train_cfg.eval_loaders
        evaluators, _, _ = build_evaluators(copy.deepcopy(eval_config), None, None, tokenizer=tokenizer,
                                            device_eval_batch_size=train_cfg.device_eval_batch_size,
                                            icl_seq_len=SEQ_LEN, icl_subset_num_batches=None)
    yield BuiltRecipe(recipe, raw, train_cfg, train_spec, evaluators, callbacks, algorithms)
    # Each StreamingDataset holds shared-memory file handles until it is collected; free this
    # recipe's before the next one is built, or the suite runs out of file descriptors.
    del train_spec, evaluators, callbacks, algorithms
    release_dead_streaming_shm()


def _train_domains(built: BuiltRecipe) -> list[str]:
    loader = built.raw['train_loader']
    if loader['name'] == 'drp_multidomain':
        return list(loader['dataset']['domains'])
    return sorted((loader['dataset'].get('streams') or {}).keys())


# --- the checks ---------------------------------------------------------------------------------

def test_train_loader_yields_a_batch(built):
    batch = next(iter(built.train_spec.dataloader))
    assert batch['input_ids'].shape == (built.train_cfg.device_train_batch_size, SEQ_LEN)
    assert int(batch['input_ids'].max()) < TINY_VOCAB
    if built.raw['train_loader']['name'] == 'drp_multidomain':
        dataset = built.train_spec.dataloader.dataset
        assert list(dataset.domain_names) == _train_domains(built)
        assert 0 <= int(batch['domain_idx'].min()) and int(batch['domain_idx'].max()) < len(dataset.domain_names)


def test_one_eval_loader_per_domain_and_each_yields_a_batch(built):
    labels = [evaluator.label.removeprefix('eval/') for evaluator in built.evaluators]
    assert sorted(labels) == sorted(_train_domains(built)), 'eval loaders must be labelled with the train domains'
    for evaluator in built.evaluators:
        batch = next(iter(evaluator.dataloader.dataloader))
        assert batch['input_ids'].shape[1] == SEQ_LEN


def test_data_scheduler_matches_the_train_dataset_and_eval_loaders(built):
    """drp_dynamic_loading's own FIT_START validation on a real Composer State with the real loaders."""
    from composer.core import State
    from composer.devices import DeviceCPU
    from composer.loggers import Logger

    callback = built.callbacks.get('drp_dynamic_loading')
    if callback is None:
        assert not any(name.startswith('drp_') for name in built.algorithms), \
            'a pruning recipe without drp_dynamic_loading'
        return
    dataset = built.train_spec.dataloader.dataset
    state = State(model=torch.nn.Linear(2, 2), rank_zero_seed=0, run_name='recipe-test', device=DeviceCPU(),
                  max_duration=built.train_cfg.max_duration, train_dataloader=built.train_spec.dataloader,
                  evaluators=built.evaluators)
    callback.fit_start(state, Logger(state))
    assert callback.policy.domain_names == list(dataset.domain_names)
    np.testing.assert_allclose(callback.policy.p_ref_initial, dataset.proportions, atol=1e-9)
    assert callback.policy.total_steps == state.max_duration.value
    reference = built.raw['callbacks']['drp_dynamic_loading']['policy'].get('reference_losses')
    if isinstance(reference, dict):
        assert sorted(reference) == sorted(dataset.domain_names)
    lagrangian = built.algorithms.get('drp_lagrangian')
    if lagrangian is not None:
        assert 0 < lagrangian.resolved_warmup_steps(state) <= state.max_duration.value


def test_pruning_target_is_reachable_from_the_source_model(built):
    from drp_foundry.pruning.architecture import DecoderArchitecture

    learner = built.algorithms.get('drp_mask_learner')
    if learner is None:
        assert 'drp_lagrangian' not in built.algorithms, 'drp_lagrangian needs drp_mask_learner'
        return
    source = DecoderArchitecture.from_hf_config(source_hf_config(built.raw['model']['pretrained_model_name_or_path']))
    target = learner.target.resolve(source, key_prefix='drp_mask_learner.target')
    pruned = source.pruned(target)
    assert pruned.count_parameters() < source.count_parameters()
    assert pruned.head_dim == source.head_dim and pruned.heads_per_group == source.heads_per_group
    size = re.search(r'_(\d+(?:\.\d+)?)b\.yaml$', built.path.name)
    if size:  # the file name states the target size: the architecture must deliver it (within 5%)
        assert pruned.count_parameters() == pytest.approx(float(size.group(1)) * 1e9, rel=0.05)


def test_fsdp_settings_suit_the_masks(built):
    from composer.utils.parallelism import FSDPConfig

    fsdp = built.raw.get('fsdp_config')
    if fsdp is None:
        return
    FSDPConfig(**fsdp)  # every key is one Composer knows
    if 'drp_mask_learner' in built.algorithms:
        assert fsdp.get('use_orig_params', True), 'the mask and lambda param groups need use_orig_params: true'
        if fsdp.get('activation_checkpointing'):
            # Composer's default is reentrant, which the mask hooks cannot use
            assert fsdp.get('activation_checkpointing_reentrant') is False
    # FSDP_VERSION=2 turns the same block into an FSDP2 config (v1-only keys dropped with a warning) that keeps the
    # sharded checkpoints and the activation checkpointing
    import warnings

    from composer.utils.parallelism import FSDP2Config

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fsdp2 = FSDP2Config.from_compatible_attrs(dict(fsdp))
    assert fsdp2.state_dict_type == fsdp.get('state_dict_type', 'sharded')
    assert fsdp2.activation_checkpointing == bool(fsdp.get('activation_checkpointing', False))


def test_multilingual_ratio_is_the_temperature_smoothed_data_size(built):
    from drp_foundry.scheduling.reference_ratio import temperature_smoothed_ratio

    variables = built.raw.get('variables') or {}
    if 'data_sizes' not in variables:
        return
    domains = _train_domains(built)
    assert sorted(variables['data_sizes']) == sorted(domains)
    expected = temperature_smoothed_ratio([variables['data_sizes'][d] for d in domains],
                                          variables['temperature_exponent'])
    proportions = built.raw['train_loader']['dataset']['proportions']
    if isinstance(proportions, dict):
        proportions = [proportions[d] for d in domains]
    np.testing.assert_allclose(proportions, expected, atol=1e-4)
