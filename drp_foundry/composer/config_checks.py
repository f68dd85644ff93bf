"""Pre-flight checks of a training YAML, run before any model is built or data is read.

LLM-Foundry already refuses unknown top-level keys, but a typo inside a component's
arguments (``callbacks.drp_dynamic_loading.rhoo``) or a missing data folder only shows
up after the model is loaded, sometimes after a first eval. These checks load the YAML
with its overrides, resolve every named component through LLM-Foundry's registries, and
compare the configured keys with the component's constructor, so such mistakes stop the
run at once with the key, the close matches and the fix.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig
from omegaconf import OmegaConf as om

from drp_foundry.composer.config_error import ConfigError
from drp_foundry.composer.config_error import batches_of as _batches


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f' Did you mean {" or ".join(repr(c) for c in close)}?' if close else ''


def accepted_keys(fn: Callable) -> tuple[set[str], bool]:
    """Keyword names ``fn`` (a class or function) accepts, and whether it takes ``**kwargs``."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = inspect.signature(target).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {'self'}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def check_kwargs(where: str, fn: Callable, kwargs: dict[str, Any], supplied_by_caller: Iterable[str] = ()) -> None:
    """Refuse keys ``fn`` does not take and required arguments that are missing."""
    names, takes_var_kwargs = accepted_keys(fn)
    if not takes_var_kwargs:
        for key in kwargs:
            if key not in names:
                raise ConfigError(f'{where}.{key}: unknown key for {getattr(fn, "__name__", fn)}.'
                                  f'{_did_you_mean(key, names)} Accepted keys: {sorted(names)}')
    target = fn.__init__ if inspect.isclass(fn) else fn
    for p in inspect.signature(target).parameters.values():
        if p.name == 'self' or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is inspect.Parameter.empty and p.name not in kwargs and p.name not in supplied_by_caller:
            raise ConfigError(f'{where}: missing required key {p.name!r} for {getattr(fn, "__name__", fn)}')


def _lookup(registry, section: str, name: str):
    try:
        return registry.get(name)
    except Exception:  # catalogue raises RegistryError; keep the message ours
        known = sorted(registry.get_all())
        raise ConfigError(f'{section}: {name!r} is not registered in LLM-Foundry\'s {section} registry.'
                          f'{_did_you_mean(name, known)} Is drp-foundry installed (pip install -e .)?') from None


def _constructible(component: Any) -> bool:
    """Components whose ``__init__`` only validates (no files, no network): ours and Composer's algorithms."""
    module = getattr(component, '__module__', '') or ''
    return module.startswith('drp_foundry.') or module.startswith('composer.algorithms')


def _check_named_components(cfg: DictConfig, section: str, registry) -> dict[str, Any]:
    """Check names and keys of a ``{name: kwargs}`` section; construct the safe ones. Returns the instances."""
    block = cfg.get(section)
    built: dict[str, Any] = {}
    if block is None:
        return built
    if not isinstance(block, DictConfig):
        raise ConfigError(f'{section}: expected a mapping of component name -> arguments')
    for name, kwargs in block.items():
        component = _lookup(registry, section, name)
        kwargs = {} if kwargs is None else om.to_container(kwargs, resolve=True)
        if not isinstance(kwargs, dict):
            raise ConfigError(f'{section}.{name}: expected a mapping of arguments, got {type(kwargs).__name__}')
        check_kwargs(f'{section}.{name}', component, kwargs)
        if _constructible(component):
            try:
                built[str(name)] = component(**kwargs)
            except (ValueError, TypeError, KeyError) as err:
                message = str(err)
                where = f'{section}.{name}'
                raise ConfigError(message if message.startswith(str(name)) else f'{where}: {message}') from None
    return built


def _check_local_mds(where: str, local: str | None, remote: str | None, split: str | None) -> None:
    if not local or remote:
        return
    path = Path(local) / split if split else Path(local)
    if not (path / 'index.json').is_file():
        raise ConfigError(f'{where}: no MDS dataset at {path} (index.json missing). Build it with '
                          '`drp-prepare-data --corpus ... --out ...` or fix the path')


def _check_multidomain(where: str, loader: dict[str, Any]) -> None:
    """The ``drp_multidomain`` section: the builder's own validation (same rules, same messages)."""
    from drp_foundry.data.multidomain_config import validate_multidomain_config

    try:
        validate_multidomain_config(loader.get('dataset'), where=f'{where}.dataset',
                                    num_workers=loader.get('num_workers', 0),
                                    prefetch_factor=loader.get('prefetch_factor', 2),
                                    drop_last=loader.get('drop_last', True))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_loader(where: str, loader: DictConfig) -> None:
    from llmfoundry import registry

    if 'name' not in loader:
        raise ConfigError(f'{where}.name: missing; name a registered dataloader (e.g. text, drp_multidomain)')
    builder = _lookup(registry.dataloaders, f'{where}.name', loader['name'])
    kwargs = {k: v for k, v in om.to_container(loader, resolve=True).items() if k not in ('name', 'label')}
    check_kwargs(where, builder, kwargs, supplied_by_caller=('tokenizer', 'device_batch_size'))
    dataset = kwargs.get('dataset')
    if loader['name'] in ('text', 'drp_text') and isinstance(dataset, dict):
        _check_local_mds(f'{where}.dataset.local', dataset.get('local'), dataset.get('remote'), dataset.get('split'))
        for stream_name, stream in (dataset.get('streams') or {}).items():
            _check_local_mds(f'{where}.dataset.streams.{stream_name}.local', stream.get('local'),
                             stream.get('remote'), stream.get('split', dataset.get('split')))


def _check_pruning_with_fsdp(cfg: DictConfig) -> None:
    """The mask hooks need non-reentrant activation checkpointing (Composer's FSDP v1 default is reentrant).

    FSDP2 (env ``FSDP_VERSION=2``) always checkpoints non-reentrant and drops the v1 key, so it is
    not asked for there.
    """
    algorithms = cfg.get('algorithms') or {}
    fsdp = cfg.get('fsdp_config') or {}
    if os.environ.get('FSDP_VERSION', '1') == '2':
        return
    if 'drp_mask_learner' in algorithms and fsdp.get('activation_checkpointing', False):
        if fsdp.get('activation_checkpointing_reentrant', True):
            raise ConfigError('fsdp_config.activation_checkpointing_reentrant: set it to false with drp_mask_learner; '
                              'reentrant checkpointing (Composer\'s default) drops the mask gradients')


_HUB_ID = __import__('re').compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


def _check_local_folder(key: str, value: Any, what: str) -> None:
    """A model/tokenizer path that is meant as a local folder must exist (and is named if not)."""
    if not value:
        return
    path = str(value)
    offline = os.environ.get('HF_HUB_OFFLINE') == '1'
    looks_local = path.startswith(('/', '.', '~')) or not _HUB_ID.match(path) or Path(path.split('/')[0]).is_dir()
    if (looks_local or offline) and not Path(path).expanduser().is_dir():
        raise ConfigError(f'{key}: {what} folder {path} does not exist (nothing is downloaded for a local path'
                          f'{"; the hub is offline" if offline else ""}); fix the path or build the folder first')


def _model_config(cfg: DictConfig):
    """The HF config of ``model.pretrained_model_name_or_path`` when it is a local folder, else None."""
    model = cfg.get('model') or {}
    path = model.get('pretrained_model_name_or_path')
    if model.get('name') != 'hf_causal_lm' or not path or not (Path(str(path)) / 'config.json').is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError) as err:
        raise ConfigError(f'model.pretrained_model_name_or_path: cannot read {path}/config.json ({err})') from None


def _check_combinations(cfg: DictConfig, algorithms: dict[str, Any]) -> None:
    """Pruning combinations that would run but not do what the user wants."""
    configured = set((cfg.get('algorithms') or {}).keys())
    if 'drp_mask_learner' in configured and 'drp_lagrangian' not in configured:
        raise ConfigError('algorithms.drp_mask_learner without algorithms.drp_lagrangian: nothing would pull the '
                          'expected size toward the target (it never moves); add `drp_lagrangian: {}`')
    if 'drp_lagrangian' in configured and 'drp_mask_learner' not in configured:
        raise ConfigError('algorithms.drp_lagrangian needs algorithms.drp_mask_learner (which attaches the masks); '
                          'add it with a target, or remove drp_lagrangian')
    run_batches, run_unit = _batches(cfg.get('max_duration'), 'max_duration')
    loader = cfg.get('train_loader') or {}
    if run_unit == 'ep' and loader.get('name') == 'drp_multidomain':
        raise ConfigError(f'max_duration: {cfg.get("max_duration")} is in epochs, but the drp_multidomain stream is '
                          'endless (a domain that runs out starts a new pass); give it in batches, e.g. 3200ba')
    lagrangian = (cfg.get('algorithms') or {}).get('drp_lagrangian') or {}
    warmup, unit = _batches(lagrangian.get('warmup_steps'), 'algorithms.drp_lagrangian.warmup_steps')
    if warmup is not None and run_batches is not None and warmup > run_batches:
        raise ConfigError(f'algorithms.drp_lagrangian.warmup_steps: {warmup} batches is longer than the run '
                          f'(max_duration {run_batches} batches), so the target would never be reached; lower it '
                          '(Sheared LLaMA: 20% of the run) or leave it out (warmup_fraction)')
    if lagrangian is not None and 'drp_lagrangian' in configured and warmup is None and run_unit in ('tok', 'sp'):
        raise ConfigError(f'algorithms.drp_lagrangian: max_duration {cfg.get("max_duration")} is not in batches, so the '
                          "warm-up cannot be placed from warmup_fraction; set warmup_steps (e.g. '640ba') or give "
                          'max_duration in batches')
    callbacks = cfg.get('callbacks') or {}
    if 'drp_dynamic_loading' in callbacks and run_unit in ('tok', 'sp'):
        raise ConfigError(f'max_duration: drp_dynamic_loading times its updates in batches; give max_duration in '
                          f'batches (e.g. 3200ba) instead of {cfg.get("max_duration")}')
    _check_scheduler_against_data(cfg)
    config = _model_config(cfg)
    if config is not None:
        dropout = {k: v for k, v in config.to_dict().items()
                   if 'dropout' in k or k.endswith('_pdrop') and isinstance(v, (int, float)) and v}
        dropout = {k: v for k, v in dropout.items() if isinstance(v, (int, float)) and v}
        if dropout:
            logging.getLogger(__name__).warning(
                'model config has dropout %s: dropout draws from the global RNG, which Composer restores only at an '
                'epoch start, so a resumed run will not be bitwise identical to an uninterrupted one', dropout)
    learner = algorithms.get('drp_mask_learner')
    if config is not None and learner is not None and hasattr(learner, 'target'):
        from drp_foundry.pruning.architecture import DecoderArchitecture, validate_target

        try:
            source = DecoderArchitecture.from_hf_config(config)
            validate_target(source, learner.target.resolve(source, key_prefix='drp_mask_learner.target'))
        except ValueError as err:
            raise ConfigError(f'algorithms.drp_mask_learner.target: {err}') from None


def _check_scheduler_against_data(cfg: DictConfig) -> None:
    """Construct the data scheduler callback once more, told the train loader's domains and proportions,
    so per-domain settings (reference losses, ratios) are checked against the data now."""
    from llmfoundry import registry

    kwargs = (cfg.get('callbacks') or {}).get('drp_dynamic_loading')
    dataset = ((cfg.get('train_loader') or {}).get('dataset') or {})
    if 'drp_dynamic_loading' not in (cfg.get('callbacks') or {}) or not dataset.get('domains'):
        return
    component = _lookup(registry.callbacks, 'callbacks', 'drp_dynamic_loading')
    names, _ = accepted_keys(component)
    kwargs = {} if kwargs is None else om.to_container(kwargs, resolve=True)
    domains = [str(d) for d in dataset['domains']]
    proportions = om.to_container(dataset['proportions'], resolve=True) if dataset.get('proportions') else None
    if isinstance(proportions, dict):
        proportions = [proportions.get(d) for d in domains]
    if 'domain_names' in names and 'domain_names' not in kwargs:
        kwargs['domain_names'] = domains
    if 'reference_ratio' in names and 'reference_ratio' not in kwargs and proportions is not None:
        kwargs['reference_ratio'] = proportions
    try:
        callback = component(**kwargs)
        policy = getattr(callback, 'policy', None)
        if proportions is not None and policy is not None:
            from drp_foundry.composer.dynamic_loading import check_reference_ratio
            from drp_foundry.data.domain_sampling import validate_proportions

            check_reference_ratio(policy.p_ref_initial, validate_proportions(proportions, domains))
    except (ValueError, TypeError, KeyError) as err:
        message = str(err)
        raise ConfigError(message if message.startswith('drp_dynamic_loading') else
                          f'callbacks.drp_dynamic_loading: {message}') from None


def _read_manifest(data_root: Path, where: str, require: bool) -> dict | None:
    from drp_foundry.data.manifest import MANIFEST, ManifestError, read_manifest

    if not (data_root / MANIFEST).is_file():
        partial = [p.name for p in (data_root / '.building', data_root.parent / f'.{data_root.name}.staging')
                   if p.exists()]
        if partial or require:
            raise ConfigError(f'{where}: {data_root} has no manifest.json, so it is not a complete data_prep build'
                              f'{" (an unfinished build left " + str(partial) + ")" if partial else ""}; rebuild it '
                              'with `drp-prepare-data`, or set require_manifest: false in the '
                              'dataset section for shards written by another tool')
        return None
    try:
        return read_manifest(data_root)
    except ManifestError as err:
        raise ConfigError(f'{where}: {err}') from None


def _check_manifest(cfg: DictConfig, manifest: dict, data_root: Path, where: str, domains: list[str],
                    seq_lens: dict[str, Any]) -> None:
    """Domains, sequence length, tokenizer, vocabulary and source freshness of one data_prep build."""
    missing = [d for d in domains if d not in manifest['domains']]
    if missing:
        raise ConfigError(f'{where}: domains {missing} are not in {data_root}/manifest.json (it holds '
                          f'{sorted(manifest["domains"])}); build them with data_prep or fix the domain list')
    built_len = manifest['settings'].get('max_seq_len')
    for key, value in seq_lens.items():
        if value is not None and built_len is not None and int(value) != int(built_len):
            raise ConfigError(f'{key}: {value}, but {data_root} was built with max_seq_len {built_len} (manifest.json); '
                              f'set {key} to {built_len} or rebuild the data with --max-seq-len {value}')
    tokenizer = (cfg.get('tokenizer') or {}).get('name')
    if tokenizer and manifest.get('tokenizer_identity') and Path(str(tokenizer)).is_dir():
        from transformers import AutoTokenizer

        from drp_foundry.data.manifest import tokenizer_identity

        try:
            loaded = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f'tokenizer.name: cannot load the tokenizer in {tokenizer} ({err})') from None
        if tokenizer_identity(loaded) != manifest['tokenizer_identity']:
            raise ConfigError(f'tokenizer.name: {tokenizer} is not the tokenizer {data_root} was tokenised with '
                              f'({manifest.get("tokenizer")}: other vocabulary, merges or EOS); use that tokenizer '
                              'or rebuild the data with this one')
    config = _model_config(cfg)
    vocab = manifest.get('vocab_size')
    if config is not None and vocab is not None and getattr(config, 'vocab_size', None) is not None \
            and int(vocab) > int(config.vocab_size):
        raise ConfigError(f'model.pretrained_model_name_or_path: vocab_size {config.vocab_size} is smaller than the '
                          f'{vocab} tokens of {data_root} (manifest.json); the data was tokenised for another model')
    corpus = manifest.get('corpus')
    for domain in domains:
        for source in (manifest.get('sources') or {}).get(domain, []):
            path = Path(corpus or '') / source['file']
            if corpus and path.is_file() and path.stat().st_size != source['bytes']:
                raise ConfigError(f'{where}: {path} changed since {data_root} was built ({source["bytes"]} -> '
                                  f'{path.stat().st_size} bytes): the data is stale. Rebuild it with data_prep '
                                  '(--overwrite)')


def _check_data_manifests(cfg: DictConfig) -> None:
    raw = om.to_container(cfg, resolve=True)
    loader = raw.get('train_loader') or {}
    dataset = loader.get('dataset') or {}
    top_len = raw.get('max_seq_len')
    # domains read from DATA_ROOT/<domain> itself: not remote (DATA_ROOT is then a download cache) nor overridden
    streams = dataset.get('streams') or {}
    local_domains = [d for d in dataset.get('domains') or []
                     if not dataset.get('remote_root') and not (streams.get(d) or {}).get('remote')
                     and not (streams.get(d) or {}).get('local')]
    if loader.get('name') == 'drp_multidomain' and dataset.get('data_root') and local_domains:
        data_root = Path(str(dataset['data_root']))
        where = 'train_loader.dataset.data_root'
        manifest = _read_manifest(data_root, where, require=dataset.get('require_manifest', True) is not False)
        if manifest is not None:
            _check_manifest(cfg, manifest, data_root, where, local_domains,
                            {'max_seq_len': top_len, 'train_loader.dataset.max_seq_len': dataset.get('max_seq_len')})
    # `text` loaders (eval loaders, a stock train loader): a folder DATA_ROOT/<domain>[/<split>] of a data_prep build
    folders: list[tuple[str, dict]] = []
    if loader.get('name') in ('text', 'drp_text'):
        folders += [(f'train_loader.dataset.streams.{name}', stream)
                    for name, stream in (dataset.get('streams') or {}).items()]
        folders.append(('train_loader.dataset', dataset))
    eval_loaders = raw.get('eval_loaders') or ([raw['eval_loader']] if raw.get('eval_loader') else [])
    folders += [(f'eval_loaders[{i}].dataset', (ev or {}).get('dataset') or {}) for i, ev in enumerate(eval_loaders)]
    for where, ds in folders:
        local = ds.get('local')
        if not local or ds.get('remote'):
            continue
        local = Path(str(local))
        for root, domain in ((local.parent, local.name), (local.parent.parent, local.parent.name)):
            manifest = _read_manifest(root, f'{where}.local', require=False)
            if manifest is not None:
                if domain in manifest['domains']:
                    _check_manifest(cfg, manifest, root, f'{where}.local', [domain],
                                    {f'{where}.max_seq_len': ds.get('max_seq_len')})
                break


def _expand_domain_evals(cfg: DictConfig) -> DictConfig:
    """Apply the ``drp_domain_evals`` config transform as LLM-Foundry will, so the loaders it makes are checked."""
    from drp_foundry.composer.domain_eval_loaders import (
        DomainEvalsError,
        expand_domain_eval_loaders,
        uses_domain_evals,
    )

    if not uses_domain_evals(cfg):
        return cfg
    try:
        # folders are checked below, loader by loader, after the train loader's
        return om.create(expand_domain_eval_loaders(om.to_container(cfg, resolve=True), check_folders=False))
    except DomainEvalsError as err:
        raise ConfigError(str(err)) from None


def check_train_config(cfg: DictConfig, resume: bool = True) -> None:
    """Check a resolved training config; raise ``ConfigError`` on the first mistake.

    ``resume``: also check the checkpoint the run would resume from (``resume_checks.py``); the
    train command does that after it holds the save_folder's lock."""
    from llmfoundry import registry
    from llmfoundry.utils.config_utils import TrainConfig

    train_loader = cfg.get('train_loader')
    if isinstance(train_loader, DictConfig) and train_loader.get('name') == 'drp_multidomain':
        # first: the drp_domain_evals transform below reads its domains
        _check_multidomain('train_loader', om.to_container(train_loader, resolve=True))
    cfg = _expand_domain_evals(cfg)
    top_level = {f.name for f in fields(TrainConfig)}
    for key in cfg:
        if key not in top_level:
            raise ConfigError(f'{key}: unknown top-level key.{_did_you_mean(key, top_level)} '
                              'Put free variables under `variables:`')
    model = cfg.get('model')
    if model is not None and model.get('name') == 'hf_causal_lm':
        _check_local_folder('model.pretrained_model_name_or_path', model.get('pretrained_model_name_or_path'),
                            'model')
    _check_local_folder('tokenizer.name', (cfg.get('tokenizer') or {}).get('name'), 'tokenizer')
    from drp_foundry.composer.preflight_checks import check_component_types

    check_component_types(cfg)  # before the components are constructed below
    _check_named_components(cfg, 'callbacks', registry.callbacks)
    algorithms = _check_named_components(cfg, 'algorithms', registry.algorithms)
    _check_named_components(cfg, 'loggers', registry.loggers)
    if 'train_loader' in cfg:
        _check_loader('train_loader', cfg.train_loader)
    eval_loaders = cfg.get('eval_loaders')
    if isinstance(eval_loaders, ListConfig):
        labels = []
        for i, loader in enumerate(eval_loaders):
            if 'label' not in loader:
                raise ConfigError(f'eval_loaders[{i}].label: missing; with several eval loaders each needs a label '
                                  '(use the domain name)')
            labels.append(loader['label'])
            _check_loader(f'eval_loaders[{i}]', loader)
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            raise ConfigError(f'eval_loaders: labels {duplicates} appear more than once; labels must be unique')
    elif cfg.get('eval_loader') is not None:
        _check_loader('eval_loader', cfg.eval_loader)
    _check_combinations(cfg, algorithms)
    from drp_foundry.composer.scheduler_warnings import warn_scheduler_setup

    warn_scheduler_setup(cfg)  # runs, but not as the paper means it: warnings only
    _check_pruning_with_fsdp(cfg)
    _check_data_manifests(cfg)
    from drp_foundry.composer.preflight_checks import check_sections

    check_sections(cfg)  # types, scheduler cadence and metric, data integrity (preflight_checks.py)
    if resume:
        from drp_foundry.composer.resume_checks import check_resume_checkpoint

        check_resume_checkpoint(cfg)


def load_train_config(yaml_path: str | os.PathLike, overrides: list[str] | None = None) -> DictConfig:
    """The YAML merged with ``key=value`` overrides, as LLM-Foundry's train entry builds it."""
    if not Path(yaml_path).is_file():
        raise ConfigError(f'config file {yaml_path} not found')
    with open(yaml_path) as f:
        cfg = om.load(f)
    if overrides:
        cfg = om.merge(cfg, om.from_cli(list(overrides)))
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f'{yaml_path}: the top level must be a mapping')
    return cfg


def check_train_config_file(yaml_path: str | os.PathLike, overrides: list[str] | None = None,
                            resume: bool = True) -> None:
    """Load and check; on a mistake print it and exit with status 2 (nothing has started yet)."""
    try:
        check_train_config(load_train_config(yaml_path, overrides), resume=resume)
    except ConfigError as err:
        raise SystemExit(f'config error in {yaml_path}: {err}') from None
