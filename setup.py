"""drp-foundry: DRPruning (structured L0 pruning + distributionally robust data
scheduling) as a plugin for MosaicML Composer and LLM-Foundry."""

from setuptools import find_packages, setup

# Components a stock LLM-Foundry ``train.py`` finds by name after ``pip install``.
# Group names are LLM-Foundry's registries (``llmfoundry/registry.py``).
ENTRY_POINTS = {
    'llmfoundry_callbacks': [
        'drp_domain_eval_loss = drp_foundry.composer.domain_eval_loss_logger:DomainEvalLossLogger',
        'drp_dynamic_loading = drp_foundry.composer.dynamic_loading:DynamicLoading',
        'drp_continuation_eval = drp_foundry.composer.continuation_eval_callback:ContinuationEval',
        'drp_fsdp2_gloo_average = drp_foundry.composer.fsdp2_gloo:Fsdp2GlooAverage',
    ],
    'llmfoundry_algorithms': [
        'drp_mask_learner = drp_foundry.composer.mask_learner:MaskLearner',
        'drp_lagrangian = drp_foundry.composer.lagrangian_updater:LagrangianUpdater',
        'drp_distillation = drp_foundry.composer.distillation:Distillation',
        'drp_cpu_autocast = drp_foundry.composer.cpu_autocast:CpuAutocast',
        'drp_unlikelihood = drp_foundry.composer.unlikelihood:Unlikelihood',
        'drp_sequence_unlikelihood = drp_foundry.composer.unlikelihood:SequenceUnlikelihood',
    ],
    'llmfoundry_dataloaders': [
        'drp_multidomain = drp_foundry.composer.multidomain_dataloader:build_multidomain_dataloader',
        # only raises: `drp_domain_evals` entries are expanded by the config transform below
        'drp_domain_evals = drp_foundry.composer.domain_eval_loaders:refuse_unexpanded',
        # LLM-Foundry's `text` loader built under the node-wide streaming shm lock (what drp_domain_evals expands to)
        'drp_text = drp_foundry.composer.domain_eval_loaders:build_drp_text_dataloader',
    ],
    # LLM-Foundry's train entry applies every registered config transform (transforms='all')
    'llmfoundry_config_transforms': [
        'drp_domain_evals = drp_foundry.composer.domain_eval_loaders:expand_domain_eval_loaders',
    ],
    'llmfoundry_loggers': [
        'drp_jsonl = drp_foundry.composer.jsonl_metrics_logger:JSONLMetricsLogger',
    ],
    # Mixture policies of drp_dynamic_loading (drp_foundry/scheduling/registry.py): a new policy
    # is one MixturePolicy subclass plus one line here (or in its own package's setup.py).
    'drp_foundry_policies': [
        'constant = drp_foundry.scheduling.policies:ConstantPolicy',
        'sheared = drp_foundry.scheduling.policies:ShearedPolicy',
        'dro = drp_foundry.scheduling.policies:DROPolicy',
        'drpruning = drp_foundry.scheduling.policies:DRPruningPolicy',
    ],
    # drp_foundry/commands/ is the only place that parses arguments; `python -m drp_foundry.commands.NAME` works too.
    'console_scripts': [
        'drp-prepare-data = drp_foundry.commands.data_prep:prepare_data_main',
        'drp-hf-corpora = drp_foundry.commands.data_prep:hf_corpora_main',
        'drp-train = drp_foundry.commands.train:main',
        'drp-demo = drp_foundry.commands.demo:main',
        'drp-export = drp_foundry.commands.export:main',
        'drp-prune-oneshot = drp_foundry.commands.oneshot:main',
        'drp-eval = drp_foundry.commands.eval:main',
        'drp-domain-loss = drp_foundry.commands.domain_loss:main',
        'drp-loop-rate = drp_foundry.commands.loop_rate:main',
        'drp-reference-losses = drp_foundry.commands.reference_losses:main',
    ],
}

setup(
    name='drp-foundry',
    version='0.1.0',
    description=__doc__,
    # the code; the embedded demo corpus keeps its sources' own licences (drp_foundry/demo/corpus/README.md)
    license='Apache-2.0',
    license_files=['LICENSE'],
    python_requires='>=3.10',
    packages=find_packages(include=['drp_foundry', 'drp_foundry.*', 'data_prep']),
    install_requires=[
        'llm-foundry==0.22.0',
        'scipy>=1.10',
        'omegaconf>=2.3',
        'matplotlib>=3.7',
        'gguf>=0.10',
        'zstandard>=0.22',  # SlimPajama ships .jsonl.zst (data_prep/hf_corpora.py)
        # llm-foundry 0.22 still imports pkg_resources, which setuptools 81 removed.
        'setuptools<81',
    ],
    extras_require={
        'gpu': ['flash-attn==2.7.4.post1'],
        # moto: local S3 server for the remote-stream tests and bench; pytest-xdist: `make test` runs on every core;
        # pytest-timeout: a test that hangs fails with its traceback instead of holding CI to its limit
        'dev': ['pytest>=7', 'pytest-xdist>=3.5', 'pytest-timeout>=2.3', 'ruff>=0.4', 'moto[server]==5.2.5'],
        # lm-eval harness for exported models (drp_foundry/eval/lm_eval_tasks); peft pinned for transformers 4.51
        'eval': ['lm-eval==0.4.8', 'peft==0.15.2'],
    },
    package_data={'drp_foundry.eval': ['lm_eval_tasks/*.yaml'],
                  # the demo's default corpus (3.4 MB), so `drp-demo` works from a wheel
                  'drp_foundry.demo': ['corpus/*.jsonl.zst', 'corpus/README.md',
                                       # the demo's recipes (yamls/demo/smollm2_*.yaml link to them)
                                       'recipes/*.yaml']},
    entry_points=ENTRY_POINTS,
)
