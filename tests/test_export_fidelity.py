"""Export and the end of pruning say whether the exported model is the trained one (issue 26, Build 3):
expected size vs target, kept-layer counts, undecided entries, masked vs exported eval loss, a warning
past a tolerance, the figures in pruning_report.json and the model card."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_projection import run

from drp_foundry.composer.mask_learner import end_of_pruning_fidelity, find_mask_module
from drp_foundry.export import FidelityWarning, export_checkpoint, export_fidelity
from drp_foundry.pruning import hard_concrete
from drp_foundry.pruning.architecture import DecoderArchitecture, TargetArchitecture
from drp_foundry.pruning.export import fold_and_slice
from drp_foundry.pruning.fidelity import TOLERANCES, mask_fidelity, undecided_shares
from drp_foundry.pruning.mask_module import L0MaskModule


def module(**kwargs):
    source = DecoderArchitecture(model_type='llama', num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=4,
                                 intermediate_size=128, vocab_size=256, head_dim=16, tie_word_embeddings=False)
    return L0MaskModule(source, TargetArchitecture(layers=3, hidden=48, heads=2, kv_heads=2, intermediate=64), **kwargs)


def test_masks_on_target_and_decided_raise_no_warning():
    masks = module(init='importance')
    scores = {key: torch.randn(masks.log_alpha(key).shape, generator=torch.Generator().manual_seed(1))
              for key in masks.granularities}
    masks.init_from_importance(scores)
    masks.project_(masks.target_sizes())  # on target at the paper's temperature 2/3 ...
    report = mask_fidelity(masks)
    assert abs(report.relative_size_gap) < 0.01 and report.worst_row_gap < 1e-3
    # ... but the kept gates then sit at log-alpha ~1.4 and are exactly 1 only about half the time
    assert report.undecided_share['total'] > 0.4 and any('undecided' in p for p in report.warnings())
    masks.temperature = 0.1  # the end of the anneal: decided and on target
    masks.harden_()
    masks.project_(masks.target_sizes())
    report = mask_fidelity(masks)
    assert report.worst_row_gap < 1e-3 and report.undecided_share['total'] == 0.0
    assert report.warnings() == []
    assert len(report.kept_layers) == 3 and all(len(row['expected']) == 3 for key, row in report.kept_rows.items()
                                                if key in ('head', 'intermediate'))


def test_open_masks_and_undecided_masks_are_flagged():
    open_masks = module()  # the paper's init: every gate open, the expected size is the source's
    report = mask_fidelity(open_masks)
    assert report.relative_size_gap > 0.3 and report.worst_row_gap > 10
    problems = report.warnings()
    assert any('expect' in p and 'parameters' in p for p in problems)
    assert any('entries off their target' in p for p in problems)
    undecided = module(init_mean=0.0, init_std=0.0)  # log-alpha 0: every gate a coin toss
    shares = undecided_shares({key: undecided.log_alpha(key) for key in undecided.granularities},
                              undecided.keep_counts('target'))
    assert shares['total'] == 1.0
    assert any('undecided' in p for p in mask_fidelity(undecided).warnings())
    assert TOLERANCES['undecided_share'] < 1.0


def test_the_decided_tolerance_sits_between_the_clamps_and_a_projected_soft_row():
    at_clamps = torch.tensor([hard_concrete.LOG_ALPHA_MAX, hard_concrete.LOG_ALPHA_MIN])
    assert undecided_shares({'layer': at_clamps}, {'layer': 1})['total'] == 0.0
    soft = torch.tensor([1.4, hard_concrete.LOG_ALPHA_MIN])  # a kept gate at log-alpha 1.4 is 1 only 45% of the time
    assert undecided_shares({'layer': soft}, {'layer': 1})['total'] == 0.5


def test_export_of_a_short_lagrangian_run_warns_and_records_the_figures(tmp_path, tiny_tokenizer_dir):
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from composer.optim import ConstantWithWarmupScheduler, DecoupledAdamW
    from test_projection import TARGET, source_model

    from drp_foundry.composer.lagrangian_updater import LagrangianUpdater
    from drp_foundry.composer.mask_learner import MaskLearner

    composer_model = HuggingFaceModel(source_model(), use_logits=True)
    rows = torch.randint(0, 512, (16, 20), generator=torch.Generator().manual_seed(5))
    loader = torch.utils.data.DataLoader([{'input_ids': r, 'labels': r} for r in rows], batch_size=4)
    Trainer(model=composer_model, optimizers=DecoupledAdamW(composer_model.parameters(), lr=1e-3),
            train_dataloader=loader, max_duration='4ba', schedulers=ConstantWithWarmupScheduler(t_warmup='0ba'),
            algorithms=[MaskLearner(TARGET), LagrangianUpdater(warmup_steps=2)], save_folder=str(tmp_path / 'run'),
            save_interval='4ba', save_filename='final.pt', progress_bar=False, log_to_console=False, device='cpu').fit()
    with pytest.warns(FidelityWarning, match='not the model the run trained'):
        export_checkpoint(tmp_path / 'run' / 'final.pt', tmp_path / 'export', tokenizer_dir=tiny_tokenizer_dir)
    record = json.loads((tmp_path / 'export' / 'pruning_report.json').read_text())
    fidelity = record['fidelity']
    assert fidelity['relative_size_gap'] > 0.02 and fidelity['warnings']
    card = (tmp_path / 'export' / 'README.md').read_text()
    assert 'Is this the model the run trained?' in card and '**warning**' in card
    assert f'{fidelity["target_num_parameters"]:,} exported' in card


def test_export_of_a_hardened_projection_run_is_the_trained_model(tmp_path, tiny_tokenizer_dir, recwarn):
    composer_model, _ = run(steps=10, init='importance', warmup=0, mask_lr=0.1, save_folder=tmp_path / 'run',
                            anneal_start_fraction=0.3, harden_fraction=0.2)
    export_checkpoint(tmp_path / 'run' / 'final.pt', tmp_path / 'export', tokenizer_dir=tiny_tokenizer_dir)
    assert not [w for w in recwarn if issubclass(w.category, FidelityWarning)]
    fidelity = json.loads((tmp_path / 'export' / 'pruning_report.json').read_text())['fidelity']
    assert fidelity['warnings'] == [] and fidelity['hardened'] and fidelity['undecided_share']['total'] == 0.0
    assert 'within tolerance: the exported model is the trained one' in (tmp_path / 'export' / 'README.md').read_text()
    # the eval losses: as trained (hardened: the export's masks) and exported agree
    hf_model = composer_model.model
    pruned, _ = fold_and_slice(hf_model, find_mask_module(composer_model).deterministic('target'))
    batches = [{'input_ids': torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    report = export_fidelity(hf_model, pruned, batches)
    assert report.masked_loss == pytest.approx(report.exported_loss, abs=1e-4)


def test_eval_loss_gap_is_flagged():
    composer_model, _ = run(steps=2, warmup=2)  # the paper's open init: masks far from the target
    hf_model = composer_model.model
    pruned, _ = fold_and_slice(hf_model, find_mask_module(composer_model).deterministic('target'))
    batches = [{'input_ids': torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))}]
    with pytest.warns(FidelityWarning):
        report = export_fidelity(hf_model, pruned, batches)
    assert report.masked_loss is not None and report.exported_loss is not None
    report.masked_loss, report.exported_loss = 5.0, 5.2
    assert any('eval loss' in p for p in report.warnings())


def test_end_of_pruning_logs_and_warns(caplog):
    masks = module()
    with caplog.at_level(logging.WARNING, logger='drp_foundry.composer.mask_learner'):
        report = end_of_pruning_fidelity(masks)
    assert report.warnings() and 'export will cut a model other than the trained one' in caplog.text
