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
On a CPU without bf16 matrix instructions (AVX2 only, for one) bf16 is emulated and a step is far
slower than in fp32 (measured: 17x slower on a 2-core AVX2 machine, ``bench/cpu_autocast_step.py
--random``); INIT warns there (``SlowCpuBf16Warning``), and the demo's ``--precision auto`` picks
fp32 (``native_cpu_bf16``).
"""

from __future__ import annotations

import logging
import warnings

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

log = logging.getLogger(__name__)

DTYPES = {'bfloat16': torch.bfloat16}
EMULATED_SLOWDOWN = 17  # fp32 step / bf16 step measured 0.06 on an AVX2-only machine (module doc)


class SlowCpuBf16Warning(UserWarning):
    """bf16 autocast on a CPU that emulates bf16: the run is many times slower than in fp32."""


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX tiles), so bf16 autocast pays.

    Unknown (a torch without the probes, another architecture) counts as no: fp32 is never the slow choice.
    """
    probes = [getattr(torch.cpu, name, None) for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
    return any(bool(probe()) for probe in probes if probe is not None)


def emulated_bf16_message(key: str) -> str:
    return (f'{key}: this CPU has no bf16 matrix instructions (AVX512-BF16 or AMX), so bf16 autocast is '
            f'emulated and a training step runs several times slower than in fp32 (about {EMULATED_SLOWDOWN}x '
            'on an AVX2 machine); train in fp32 here (remove drp_cpu_autocast; the demo: --precision fp32 or auto)')


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
            if not native_cpu_bf16():
                message = emulated_bf16_message('drp_cpu_autocast')
                log.warning(message)
                warnings.warn(message, SlowCpuBf16Warning, stacklevel=2)
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
