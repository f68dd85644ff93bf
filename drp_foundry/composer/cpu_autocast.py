"""bf16 autocast for training on CPU (registered as ``drp_cpu_autocast``; ours).

Composer autocasts on CUDA and XLA only (``precision: amp_bf16`` is refused on a CPU device),
so a CPU run is fp32. On CPUs with bf16 matrix instructions (AVX512-BF16, AMX) autocast makes
the forward, the loss and the distillation teacher's forward markedly faster (the README gives
the demo's measured step times). This algorithm opens ``torch.autocast('cpu',
bfloat16)`` at ``BEFORE_FORWARD`` and closes it at ``BEFORE_BACKWARD``, so the student's
forward, the loss, the Lagrangian penalty and the teacher forward of ``drp_distillation``
(``AFTER_LOSS``) run under it, and the backward runs outside it, as with ``torch.autocast``
anywhere. The weights, optimizer state, masks and λ stay float32; evaluation stays fp32.

    precision: fp32
    algorithms:
      drp_cpu_autocast: {}

On a GPU use ``precision: amp_bf16`` instead; this algorithm refuses a non-CPU device at INIT.
"""

from __future__ import annotations

import logging

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

log = logging.getLogger(__name__)

DTYPES = {'bfloat16': torch.bfloat16}


class CpuAutocast(Algorithm):
    """bf16 autocast of the training forward and loss on a CPU device (``drp_cpu_autocast``).

    Args:
        dtype: the autocast dtype; ``bfloat16`` (the one CPU autocast runs fast).

    Example:
        >>> from drp_foundry import CpuAutocast
        >>> algorithm = CpuAutocast(dtype='bfloat16')  # Trainer(..., device='cpu', algorithms=[algorithm])
        >>> algorithm.dtype
        torch.bfloat16
    """

    def __init__(self, dtype: str = 'bfloat16'):
        if dtype not in DTYPES:
            raise ValueError(f'drp_cpu_autocast.dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
        self.dtype = DTYPES[dtype]
        self._context: torch.autocast | None = None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.BEFORE_FORWARD, Event.BEFORE_BACKWARD, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            device = state.device._device if hasattr(state.device, '_device') else torch.device('cpu')
            if torch.device(device).type != 'cpu':
                raise ValueError(f'drp_cpu_autocast runs on a CPU device, this run is on {device}; on a GPU set '
                                 f'`precision: amp_bf16` and remove drp_cpu_autocast')
            log.info('drp_cpu_autocast: training forward and loss under torch.autocast(cpu, %s)', self.dtype)
        elif event == Event.BEFORE_FORWARD:
            self._close()  # a microbatch that raised before its backward leaves nothing open
            self._context = torch.autocast('cpu', dtype=self.dtype)
            self._context.__enter__()
        elif event in (Event.BEFORE_BACKWARD, Event.FIT_END):
            self._close()

    def _close(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)
