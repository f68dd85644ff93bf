"""lm-eval task class for the drp continuation benchmark: reads our items from local JSONL.

The items file is named by the environment variable ``DRP_CONTINUATION_ITEMS`` (the file
``drp-eval build`` writes); each task keeps the items of the domain
in its YAML's ``metadata.domain``. Choices are ``[right, wrong]`` and the gold answer is
0, so lm-eval's ``acc`` compares summed log-likelihoods and ``acc_norm`` compares them
per character.
"""

from __future__ import annotations

import os

import datasets
from lm_eval.api.task import ConfigurableTask

from drp_foundry.eval.continuation_scorer import read_items

ITEMS_ENV = 'DRP_CONTINUATION_ITEMS'


class ContinuationTask(ConfigurableTask):
    def __init__(self, config: dict | None = None):
        config = dict(config or {})
        config.pop('class', None)
        super().__init__(config=config)

    def download(self, dataset_kwargs=None) -> None:
        path = os.environ.get(ITEMS_ENV)
        if not path:
            raise ValueError(f'set {ITEMS_ENV} to the continuation items JSONL (built with '
                             '`drp-eval build ...`) before running lm_eval')
        domain = (self.config.metadata or {}).get('domain')
        if not domain:
            raise ValueError(f'task {self.config.task}: its YAML needs metadata.domain')
        rows = [{'context': item.context, 'choices': [item.right, item.wrong], 'label': 0}
                for item in read_items(path) if item.domain == domain]
        if not rows:
            raise ValueError(f'{path} holds no items for domain {domain!r} (task {self.config.task}); build items '
                             'for it or leave the task out of --tasks')
        self.dataset = datasets.DatasetDict({'test': datasets.Dataset.from_list(rows)})
