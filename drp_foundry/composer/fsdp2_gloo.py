"""FSDP2 on gloo (CPU) sums gradients over ranks instead of averaging them; this callback makes it average.

FSDP2 reduce-scatters fp32 gradients with ``ReduceOp.AVG``. NCCL averages; gloo (PyTorch 2.7)
silently returns the sum (pytorch/pytorch#162338), so on CPU ranks every gradient is ``world_size``
times the DDP / one-process gradient. Adam hides most of it (it is nearly scale-invariant), but
anything that reads gradient magnitudes does not: Composer's ``gradient_clipping`` clips at a
different point than the same run on one rank (measured on tests/sharded_harness.py's 2-rank run:
gradient norm 1.624 vs 0.812, and losses 1.5e-3 apart after 8 batches; with this callback they agree).

``drp_fsdp2_gloo_average`` (registered callback; ``drp-train`` adds it to every run under
``FSDP_VERSION=2``) checks at ``FIT_START`` whether the model is sharded by FSDP2 and whether its
process group's reduce-scatter with ``AVG`` really averages (one 2-element collective). Only where it
sums does it install a post-reduce-scatter hook (``FSDPModule.set_all_reduce_hook``) on every FSDP2
unit that divides the reduced gradient shard by the group size. On NCCL, on one rank, and once
PyTorch fixes gloo, it does nothing.
"""

from __future__ import annotations

import logging

import torch
from composer.core import Callback, State
from composer.loggers import Logger

log = logging.getLogger(__name__)

__all__ = ['Fsdp2GlooAverage', 'average_fsdp2_gradients_on_gloo', 'reduce_scatter_avg_sums']


def reduce_scatter_avg_sums(group) -> bool:
    """Whether ``reduce_scatter_tensor(op=AVG)`` on ``group`` returns the sum (a collective: every rank calls it)."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    if size < 2:  # nothing to reduce: the sum is the average
        return False
    contribution = torch.ones(size * 2)  # every rank sends ones: the average is 1, the sum ``size``
    out = torch.empty(2)
    dist.reduce_scatter_tensor(out, contribution, op=dist.ReduceOp.AVG, group=group)
    return bool(torch.allclose(out, torch.full_like(out, float(size))))


def _fsdp2_units(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def average_fsdp2_gradients_on_gloo(model: torch.nn.Module) -> int:
    """Make the FSDP2 units of ``model`` average their reduced gradients where the backend sums them.

    Returns the number of units given the dividing hook (0 when nothing needed it). Must run on every
    rank (it makes one collective per distinct process group).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0
    fixed = 0
    verdicts: dict[int, bool] = {}
    for unit in _fsdp2_units(model):
        group_info = unit._get_fsdp_state()._fsdp_param_group
        if group_info is None:  # a unit that manages no parameter
            continue
        group = group_info.mesh_info.shard_process_group
        if dist.get_backend(group) != 'gloo':
            continue
        if id(group) not in verdicts:
            verdicts[id(group)] = reduce_scatter_avg_sums(group)
        if verdicts[id(group)]:
            size = dist.get_world_size(group)
            unit.set_all_reduce_hook(lambda reduced, size=size: reduced.div_(size))
            fixed += 1
    return fixed


class Fsdp2GlooAverage(Callback):
    """``drp_fsdp2_gloo_average``: at ``FIT_START``, ``average_fsdp2_gradients_on_gloo(state.model)``.

    Example:
        >>> from drp_foundry import Fsdp2GlooAverage
        >>> callback = Fsdp2GlooAverage()  # Trainer(..., callbacks=[callback]); drp-train adds it under FSDP_VERSION=2
        >>> callback.units_fixed  # FSDP2 units given the averaging hook, set at FIT_START
        0
    """

    def __init__(self):
        self.units_fixed = 0

    def fit_start(self, state: State, logger: Logger) -> None:
        self.units_fixed = average_fsdp2_gradients_on_gloo(state.model)
        if self.units_fixed:
            log.info('drp_fsdp2_gloo_average: gloo sums FSDP2 gradients (pytorch/pytorch#162338); %d FSDP2 units now '
                     'divide them by the group size', self.units_fixed)
