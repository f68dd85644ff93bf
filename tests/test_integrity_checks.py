"""The pieces behind issue 28's table rows, on their own: types, loaded weights, old exports, evaluator metrics."""

from __future__ import annotations

import json
from typing import Optional

import pytest
import torch

from drp_foundry.checkpoint_checks import non_finite_tensors
from drp_foundry.composer.config_error import ConfigError
from drp_foundry.composer.dynamic_loading import check_loss_metric_computed
from drp_foundry.composer.mask_learner import refuse_non_finite_parameters
from drp_foundry.composer.preflight_checks import check_value_type
from drp_foundry.output_files import foreign_files, record_written_files


def _typed(rate: float = 1.0, steps: int = 3, flag: bool = True, name: str = 'x', maybe: Optional[float] = None,
           anything=None, pair: tuple = (1, 2)):
    return rate, steps, flag, name, maybe, anything, pair


@pytest.mark.parametrize('kwargs,fragment', [
    ({'rate': 'fast'}, "f.rate: 'fast' is str, but it must be a number"),
    ({'rate': True}, 'f.rate: True is bool'),
    ({'steps': 2.0}, 'f.steps: 2.0 is float, but it must be an integer'),
    ({'flag': 'yes'}, 'true or false'),
    ({'name': 3}, 'f.name: 3 is int, but it must be a string'),
    ({'maybe': 'a'}, 'f.maybe'),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        check_value_type('f', _typed, kwargs)
    assert fragment in str(err.value)


def test_values_of_the_right_type_and_unjudged_annotations_pass():
    check_value_type('f', _typed, {'rate': 1, 'steps': 3, 'flag': False, 'name': 'y', 'maybe': None, 'anything': 'z',
                                   'pair': [1, 2]})


def test_non_finite_weights_after_a_load_stop_the_run_naming_them():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    refuse_non_finite_parameters(model)  # a fresh model passes
    with torch.no_grad():
        model[1].bias[0] = float('inf')
    with pytest.raises(ValueError, match=r"\['1.bias'\]"):
        refuse_non_finite_parameters(model)
    assert non_finite_tensors({'a': {'b': torch.tensor([1.0, float('nan')])}, 'c': torch.ones(2), 'd': 3}) == ['a.b']


def test_an_export_without_a_file_list_is_judged_by_the_names_an_export_writes(tmp_path):
    for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'pruning_report.json', 'README.md', 'notes.md'):
        (tmp_path / name).write_text('{}')
    (tmp_path / 'eval').mkdir()
    (tmp_path / 'eval' / 'x.json').write_text('{}')
    assert foreign_files(tmp_path, 'pruning_report.json') == ['eval/x.json', 'notes.md']
    (tmp_path / 'notes.md').unlink()
    (tmp_path / 'eval' / 'x.json').unlink()
    record_written_files(tmp_path, 'pruning_report.json')
    assert 'tokenizer.json' in json.loads((tmp_path / 'pruning_report.json').read_text())['written_files']
    (tmp_path / 'domain_losses.json').write_text('{}')
    assert foreign_files(tmp_path, 'pruning_report.json') == ['domain_losses.json']


def test_a_loss_metric_no_evaluator_computes_is_refused_listing_those_that_exist():
    class _Evaluator:
        label, metric_names = 'eval/wiki', ['LanguageCrossEntropy', 'LanguagePerplexity']

    class _State:
        evaluators, eval_metrics = [_Evaluator()], {}

    check_loss_metric_computed(_State(), 'LanguagePerplexity')
    with pytest.raises(ValueError, match="no evaluator computes 'TokenAccuracy'.*LanguageCrossEntropy"):
        check_loss_metric_computed(_State(), 'TokenAccuracy')
