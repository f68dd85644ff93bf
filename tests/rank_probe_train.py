"""``train.py`` with one test-only callback, ``drp_test_rank_probe``, registered first (tests/sharded_harness.py).

Every rank appends to ``<folder>/grad_norm_rank<r>.jsonl`` the norm of the full gradient after each
backward (before clipping), and to ``<folder>/rank<r>.jsonl`` what must be the same on all ranks: at each
scheduler update (``EVAL_AFTER_ALL``, after ``drp_dynamic_loading``) the full log-alphas and
lambdas (FSDP2 shards gathered), the expected size the scheduler read, the dataset's mixture and
the policy's reference ratio (with ``masks_every_batch: true`` also after every batch, to
``masks_rank<r>.jsonl``: the full log-alphas and the temperature after the algorithms' ``BATCH_END``); at
``FIT_END`` rank 0 also saves the model's full state dict
(``model_state.pt``), to build a single-process checkpoint of the same state.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from llmfoundry.registry import callbacks

REPO = Path(__file__).resolve().parents[1]


def _full(tensor: torch.Tensor) -> list:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().reshape(-1).tolist()


class RankProbe(Callback):
    def __init__(self, folder: str, masks_every_batch: bool = False):
        self.folder = Path(folder)
        self.masks_every_batch = masks_every_batch

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.masks_every_batch:
            return
        from drp_foundry.composer.mask_learner import find_mask_module

        masks = find_mask_module(state.model)
        record = {'step': int(state.timestamp.batch), 'temperature': masks.temperature, 'hardened': masks.hardened,
                  'log_alpha': {key: _full(masks.log_alpha(key)) for key in masks.granularities},
                  'shapes': {key: list(masks.log_alpha(key).shape) for key in masks.granularities}}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f'masks_rank{dist.get_global_rank()}.jsonl', 'a') as f:
            f.write(json.dumps(record) + '\n')

    def _write(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f'rank{dist.get_global_rank()}.jsonl', 'a') as f:
            f.write(json.dumps(record) + '\n')

    def eval_after_all(self, state: State, logger: Logger) -> None:
        from drp_foundry.composer.dynamic_loading import DynamicLoading, find_mixture_dataset
        from drp_foundry.composer.mask_learner import find_mask_module

        masks = find_mask_module(state.model)
        scheduler = next(cb for cb in state.callbacks if isinstance(cb, DynamicLoading))
        self._write({
            'step': int(state.timestamp.batch),
            'log_alpha': {key: _full(masks.log_alpha(key)) for key in masks.granularities},
            'lambda': {key: [_full(masks.lambda_1(key))[0], _full(masks.lambda_2(key))[0]]
                       for key in masks.granularities},
            'expected_params': float(masks.last_size_terms.num_parameters),
            'mixture': [float(x) for x in find_mixture_dataset(state.train_dataloader).proportions],
            'reference_ratio': [float(x) for x in scheduler.policy.p_ref],
        })

    def after_backward(self, state: State, logger: Logger) -> None:
        """The gradient norm before clipping (the run has one microbatch per rank), over the full gradients."""
        import torch.distributed as tdist
        from torch.distributed.tensor import DTensor

        sharded = torch.zeros(1, dtype=torch.float64)
        whole = 0.0
        for param in state.model.parameters():
            if param.grad is None:
                continue
            if isinstance(param.grad, DTensor):
                sharded += param.grad.to_local().double().pow(2).sum()
            else:
                whole += float(param.grad.double().pow(2).sum())
        if tdist.is_initialized() and dist.get_world_size() > 1:
            tdist.all_reduce(sharded)
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f'grad_norm_rank{dist.get_global_rank()}.jsonl', 'a') as f:
            f.write(json.dumps({'step': int(state.timestamp.batch), 'grad_norm': (float(sharded) + whole) ** 0.5}) + '\n')

    def fit_end(self, state: State, logger: Logger) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        from drp_foundry.composer.distillation import Distillation

        teacher = next((a.teacher for a in state.algorithms if isinstance(a, Distillation)), None)
        if teacher is not None:  # how much of the teacher this rank holds
            self.folder.mkdir(parents=True, exist_ok=True)
            params = list(teacher.parameters())
            (self.folder / f'teacher_rank{dist.get_global_rank()}.json').write_text(json.dumps({
                'local': sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
                'total': sum(p.numel() for p in params),
                'sharded': sum(isinstance(p, DTensor) for p in params), 'tensors': len(params)}))

        if state.fsdp_config is not None:
            model_state = get_model_state_dict(state.model, options=StateDictOptions(full_state_dict=True,
                                                                                     cpu_offload=True))
        else:
            model = getattr(state.model, 'module', state.model)  # DDP's wrapper
            model_state = {key: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                           for key, value in model.state_dict().items()}
        if dist.get_global_rank() == 0:
            torch.save(model_state, self.folder / 'model_state.pt')


if __name__ == '__main__':
    callbacks.register('drp_test_rank_probe', func=RankProbe)
    sys.argv = [str(REPO / 'train.py')] + sys.argv[1:]
    runpy.run_path(str(REPO / 'train.py'), run_name='__main__')
