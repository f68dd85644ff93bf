"""``drp_dynamic_loading``: rewrite the training mixture after each evaluation (DRPruning §3).

At ``EVAL_AFTER_ALL`` the callback reads each domain's eval loss (eval loaders labelled
with the domain names; LLM-Foundry names them ``eval/<domain>``, plain Composer
``<domain>``), the samples each domain has contributed so far (T_i, from the train
dataset) and, while pruning, the expected parameter count P of the model's L0 masks
(``hf_model.drp_masks.expected_num_parameters()``; otherwise the model's parameter count,
a constant). A ``drp_foundry.scheduling.policies`` policy turns them into the new mixture
q, which the dataset applies through ``set_proportions(q, at_batch)``.

Ranks: rank 0 runs the policy and broadcasts its whole state (q included), so every rank
ends each update with bit-identical proportions and policy state.

Artifacts: at each update the per-domain eval loss, EMA loss, reference loss, excess loss,
q, p_R and fit quality go to Composer's loggers under ``drp/<quantity>/<domain>``; a plot
of their trajectories (and of the expected parameter count) is drawn (rank 0) at each
checkpoint event, after the last update and at ``FIT_END`` and written as a PNG to
``plot_folder`` (default ``{run_name}/drp_dynamic_loading``, beside Composer's default
``{run_name}/checkpoints``); after the last update (or at ``FIT_END`` if later) it is also sent
to the loggers as an image (``logger.log_images``, name ``drp/mixture_trajectories``; off
with ``log_images: false``), so MLflow / W&B runs show it without the file.

Everything the updates depend on is in ``state_dict`` (Composer checkpoints), so a
resumed run makes the same updates as an uninterrupted one.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from omegaconf import DictConfig, OmegaConf

from drp_foundry.composer.domain_eval_losses import domain_of_label, read_domain_eval_losses
from drp_foundry.composer.hf_model import unwrap_hf_model
from drp_foundry.composer.run_length import max_duration_in_batches
from drp_foundry.mixtures import per_domain
from drp_foundry.pruning.architecture import DecoderArchitecture
from drp_foundry.pruning.hf_injection import get_mask_module
from drp_foundry.scheduling.policies import MixturePolicy
from drp_foundry.scheduling.registry import build_policy, check_policy_config
from drp_foundry.scheduling.setup_warnings import source_reference_warning

log = logging.getLogger(__name__)

__all__ = ['DynamicLoading', 'apply_dynamic_loading', 'find_mixture_dataset', 'read_eval_losses']

_DATASET_CONTRACT = ('domain_names', 'proportions', 'set_proportions', 'samples_per_domain')
_PLOT_NAME = 'mixture_trajectories.png'
_CALLBACK_KEYS = ('policy', 'domain_names', 'reference_ratio', 'plot_folder', 'loss_metric', 'log_images')
# the flat spelling before policies owned their keys (refused with the new form)
_OLD_FLAT_KEYS = ('reference_losses', 'rho', 'min_ratio', 'floor_at_min_reference', 'ema_weight', 'eval_loss_ema',
                  'update_interval', 'smoothing', 'floors_in_constraint', 'clamp_ratio_to_initial_range', 'clip_excess_at_zero', 'fit_start_fraction', 'ratio_start_fraction',
                  'history_start_fraction', 'ratio_delta', 'max_ratio_factor', 'target_params', 'max_history_points',
                  'min_fit_points', 'huber_delta', 'num_best_fits')
_RENAMED = {'ema_weight': 'eval_loss_ema'}  # old flat key -> its policy key


def find_mixture_dataset(dataloader: Any) -> Any:
    """The train dataset that honours the scheduler contract of docs/DESIGN.md."""
    dataset = getattr(dataloader, 'dataset', None)
    missing = [name for name in _DATASET_CONTRACT if not hasattr(dataset, name)]
    if dataset is None or missing:
        raise ValueError(
            f'drp_dynamic_loading: the train dataset ({type(dataset).__name__}) lacks {missing} of the mixture '
            f'contract {list(_DATASET_CONTRACT)}; use drp-foundry\'s multi-domain train_loader')
    return dataset


def read_eval_losses(state: State, domain_names: Sequence[str], metric_name: str) -> np.ndarray:
    """Each domain's eval loss from ``state.eval_metrics`` (NaN where the loader has not run yet)."""
    losses = read_domain_eval_losses(state, domain_names, metric_name, missing='nan')
    return np.array([losses[d] for d in domain_names], dtype=np.float64)


def _model_size(model: torch.nn.Module) -> int:
    """Parameter count from the HF config when it is a supported decoder (right under FSDP, where
    each rank holds a shard); otherwise the local parameter count."""
    config = getattr(model, 'config', None)
    if config is not None:
        try:
            return DecoderArchitecture.from_hf_config(config).count_parameters()
        except (ValueError, AttributeError):
            pass
    return sum(p.numel() for p in model.parameters())


def apply_dynamic_loading(policy: MixturePolicy, dataset: Any, step: int, eval_losses: Sequence[float],
                          expected_params: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One scheduler update without a Trainer: policy update on rank 0, broadcast, set the dataset's mixture.

    Call on every rank. Returns the mixture and the update's diagnostics.
    """
    samples = np.asarray(dataset.samples_per_domain(step), dtype=np.float64)
    payload: list[Any] = [None]
    if dist.get_global_rank() == 0:
        q = policy.update(step, eval_losses, samples, expected_params)
        payload = [{'policy_state': policy.state_dict(), 'diagnostics': policy.last_diagnostics, 'q': q.tolist()}]
    dist.broadcast_object_list(payload, src=0)
    result = payload[0]
    if dist.get_global_rank() != 0:
        policy.load_state_dict(result['policy_state'])
        policy.last_diagnostics = result['diagnostics']
    q = np.asarray(result['q'], dtype=np.float64)
    if result['diagnostics']['updated']:
        dataset.set_proportions(q, at_batch=step)
    return q, result['diagnostics']


def check_reference_ratio(reference_ratio: Sequence[float], dataset_proportions: Sequence[float]) -> None:
    """The policy's p_R0 must be the mixture the dataset starts with (the pre-flight check calls this too)."""
    reference, dataset = np.asarray(reference_ratio, dtype=np.float64), np.asarray(dataset_proportions, dtype=np.float64)
    if reference.shape != dataset.shape or not np.allclose(dataset, reference, atol=1e-6):
        raise ValueError(f'drp_dynamic_loading.reference_ratio {reference.tolist()} differs from the train dataset\'s '
                         f'initial proportions {dataset.tolist()}; give both the same values (or omit '
                         'reference_ratio to use the dataset\'s)')


def check_loss_metric_computed(state: State, metric_name: str) -> None:
    """``loss_metric`` must be a metric the evaluators compute (else every update keeps the old mixture)."""
    names: set[str] = set()
    for evaluator in state.evaluators:
        names |= set(getattr(evaluator, 'metric_names', None) or [])
    for metrics in (state.eval_metrics or {}).values():
        names |= set(metrics)
    if names and metric_name not in names:
        raise ValueError(f'drp_dynamic_loading.loss_metric: no evaluator computes {metric_name!r}; the eval metrics '
                         f'are {sorted(names)}')


def check_eval_losses_finite(state: State, domain_names: Sequence[str], losses: np.ndarray, metric_name: str) -> None:
    """An eval that ran and gave no finite loss stops the run: the scheduler cannot act on it."""
    ran = {domain_of_label(label): metrics[metric_name] for label, metrics in (state.eval_metrics or {}).items()
           if metric_name in metrics}
    bad = {d: float(v) for d, v in zip(domain_names, losses)
           if not np.isfinite(v) and d in ran and getattr(ran[d], 'update_called', True)}
    if bad:
        raise ValueError(f'drp_dynamic_loading: the eval loaders of {sorted(bad)} ran but gave no finite '
                         f'{metric_name} ({bad}) at batch {state.timestamp.batch.value}; the scheduler cannot update '
                         'the mixture. Check those eval loaders (empty split? a diverged model?) and loss_metric')


class DynamicLoading(Callback):
    """Rewrites the train dataset's domain mixture after each evaluation.

    Args:
        policy: ``{name: <policy>, <its keys>}``: ``constant``, ``sheared``, ``dro``,
            ``drpruning`` or any policy registered under the entry-point group
            ``drp_foundry_policies``. Its keys are the policy class's arguments
            (``drp_foundry.scheduling.policies``); ``sheared`` and ``dro`` need
            ``reference_losses`` ({domain: loss}), the losses expected of a model of the
            *target* size (see ``drp_foundry.scheduling.reference_losses``). Default
            ``{name: drpruning}``.
        domain_names: optional; must equal the train dataset's ``domain_names`` (same order).
        reference_ratio: p_R0 as a list (dataset order) or ``{domain: ratio}``; default: the
            train dataset's initial proportions. Must match them when given.
        plot_folder: where the trajectory PNG goes (``{run_name}`` is filled in); '' or None
            disables the file (the image still goes to the loggers).
        loss_metric: the eval metric read per domain.
        log_images: also send the plot to Composer's loggers at the end of training
            (``logger.log_images``, name ``drp/mixture_trajectories``).
        The flat keys of earlier versions (``rho: ...`` beside ``policy``) are refused with
        the new spelling.

    Example:
        >>> from drp_foundry import DynamicLoading
        >>> callback = DynamicLoading(policy={'name': 'dro', 'rho': 0.1, 'reference_losses': {'wiki': 2.0, 'github': 2.4}})
        >>> callback.policy_name, callback.policy_config['rho']  # Trainer(..., callbacks=[callback]), drp_multidomain data
        ('dro', 0.1)
        >>> DynamicLoading(policy={'name': 'dro', 'rhoo': 0.1})
        Traceback (most recent call last):
        ...
        ValueError: ...rhoo...
    """

    def __init__(
        self,
        policy: Mapping[str, Any] | None = None,
        domain_names: Sequence[str] | None = None,
        reference_ratio: Sequence[float] | Mapping[str, float] | None = None,
        plot_folder: str | None = '{run_name}/drp_dynamic_loading',
        loss_metric: str = 'LanguageCrossEntropy',
        log_images: bool = True,
        **old_keys: Any,
    ):
        if old_keys or isinstance(policy, str):
            flat = {key: value for key, value in old_keys.items() if key in _OLD_FLAT_KEYS}
            unknown = sorted(set(old_keys) - set(flat))
            if unknown:
                hints = {key: difflib.get_close_matches(key, _CALLBACK_KEYS + _OLD_FLAT_KEYS, n=1) for key in unknown}
                hint = ''.join(f' Did you mean {close[0]!r}' + ('' if close[0] in _CALLBACK_KEYS else
                                                                ' (a policy key: inside `policy`)') + '?'
                               for close in hints.values() if close)
                raise ValueError(f'drp_dynamic_loading: unknown keys {unknown}; the callback\'s keys are '
                                 f'{sorted(_CALLBACK_KEYS)} and the policy\'s keys go inside `policy`.{hint}')
            name = policy if isinstance(policy, str) else dict(policy or {}).get('name', 'drpruning')
            example = ', '.join([f'name: {name}'] + [f'{_RENAMED.get(key, key)}: {value}' for key, value in flat.items()])
            raise ValueError(f'drp_dynamic_loading: the policy and its settings ({sorted(flat) or "policy"}) now go in '
                             f'one mapping; write `policy: {{{example}}}` (keys of each policy: '
                             'drp_foundry.scheduling.policies)')
        if isinstance(policy, DictConfig):
            policy = OmegaConf.to_container(policy, resolve=True)
        self.policy_config = dict(policy) if policy is not None else {'name': 'drpruning'}
        check_policy_config(self.policy_config, domain_names, where='drp_dynamic_loading.policy')
        self.policy_name = str(self.policy_config['name'])
        self.domain_names = None if domain_names is None else list(domain_names)
        self.reference_ratio = reference_ratio
        self.plot_folder = plot_folder or None
        self.loss_metric = loss_metric
        self.log_images = bool(log_images)
        self.policy: MixturePolicy | None = None
        self.trajectory: list[dict[str, Any]] = []
        self._pending_state: dict[str, Any] | None = None
        self._constant_params: float | None = None
        self._last_written_step = self._last_logged_step = -1
        if self.domain_names is not None and reference_ratio is not None:
            self.policy = self._build_policy(self.domain_names)  # fail on bad values now, not at the first eval

    # -- setup and validation -------------------------------------------------------------
    def _build_policy(self, domain_names: list[str], default_ratio: Sequence[float] | None = None) -> MixturePolicy:
        if self.reference_ratio is None:
            ratio = default_ratio
        else:
            ratio = per_domain(self.reference_ratio, domain_names, 'drp_dynamic_loading.reference_ratio')
        return build_policy(self.policy_config, domain_names, ratio, where='drp_dynamic_loading.policy')

    def _setup(self, state: State) -> None:
        """Validate against the train dataset and build the policy (BEFORE_LOAD and FIT_START)."""
        if state.train_dataloader is None:
            return
        dataset = find_mixture_dataset(state.train_dataloader)
        names = list(dataset.domain_names)
        if self.domain_names is not None and self.domain_names != names:
            raise ValueError(f'drp_dynamic_loading.domain_names {self.domain_names} differ from the train dataset '
                             f'domains {names}; list the same domains in the same order (or omit the key)')
        dataset_ratio = np.asarray(dataset.proportions, dtype=np.float64)
        if self.policy is None:
            # resuming: the dataset already holds the latest q, the initial ratio is in the checkpoint
            initial = dataset_ratio if self._pending_state is None else self._pending_state['p_ref_initial']
            self.policy = self._build_policy(names, initial)
        elif self.policy.domain_names != names:
            raise ValueError(f'drp_dynamic_loading: policy domains {self.policy.domain_names} differ from the '
                             f'train dataset domains {names}')
        if self._pending_state is not None:
            self.policy.load_state_dict(self._pending_state)
            self._pending_state = None
        if self.policy.num_updates == 0 and state.timestamp.batch.value == 0:
            check_reference_ratio(self.policy.p_ref_initial, dataset_ratio)
        self.policy.total_steps = max_duration_in_batches(state, 'drp_dynamic_loading')
        if getattr(self.policy, 'target_params', 0) is None:
            masks = get_mask_module(unwrap_hf_model(state.model))
            if masks is not None and hasattr(masks, 'target_num_parameters'):
                self.policy.target_params = float(masks.target_num_parameters())

    def _check_evaluators(self, state: State) -> None:
        labels = {evaluator.label for evaluator in state.evaluators}
        missing = [d for d in self.policy.domain_names if d not in labels and f'eval/{d}' not in labels]
        if missing:
            raise ValueError(f'drp_dynamic_loading: no eval loader labelled {missing} (labels: {sorted(labels)}); '
                             'add one eval_loader per domain with `label: <domain>`')

    def before_load(self, state: State, logger: Logger) -> None:
        del logger
        self._setup(state)

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger
        self._setup(state)
        self._check_evaluators(state)
        check_loss_metric_computed(state, self.loss_metric)
        dataset = find_mixture_dataset(state.train_dataloader)
        if self.policy.num_updates > 0 and not np.allclose(dataset.proportions, self.policy.q, atol=1e-12):
            log.warning('drp_dynamic_loading: the resumed dataset mixture %s differs from the scheduler\'s %s; '
                        'setting it', np.asarray(dataset.proportions).tolist(), self.policy.q.tolist())
            dataset.set_proportions(self.policy.q, at_batch=state.timestamp.batch.value)

    # -- the update -----------------------------------------------------------------------
    def _expected_params(self, state: State) -> float:
        model = unwrap_hf_model(state.model)
        masks = get_mask_module(model)
        if masks is not None:
            # recorded in the last training forward, where FSDP had the mask parameters gathered
            # (NoSizeTermsError before the first one: the local parameters may be FSDP shards)
            return float(masks.last_size_terms.num_parameters)
        if self._constant_params is None:
            self._constant_params = float(_model_size(model))
        return self._constant_params

    def eval_after_all(self, state: State, logger: Logger) -> None:
        if self.policy is None or self.policy.total_steps is None:
            self._setup(state)
        dataset = find_mixture_dataset(state.train_dataloader)
        step = state.timestamp.batch.value
        losses = read_eval_losses(state, self.policy.domain_names, self.loss_metric)
        check_eval_losses_finite(state, self.policy.domain_names, losses, self.loss_metric)
        expected_params = self._expected_params(state)
        q, diagnostics = apply_dynamic_loading(self.policy, dataset, step, losses, expected_params)
        if diagnostics.get('skipped'):
            return
        if self.policy.num_updates == 1:
            self._warn_source_references(state, losses, expected_params)
        point = {key: diagnostics.get(key) for key in (
            'step', 'eval_losses', 'ema_losses', 'reference_losses', 'excess_losses', 'q', 'p_ref')}
        point['expected_params'] = float(expected_params)
        self.trajectory.append(point)
        logger.log_metrics(self._metrics(diagnostics))
        if step >= self.policy.total_steps:
            self._write_plot(state, logger)  # the last update: the file and the loggers' image

    def _warn_source_references(self, state: State, losses: np.ndarray, expected_params: float) -> None:
        """At the first update of a pruning run: fixed references that look like the source model's losses."""
        masks = get_mask_module(unwrap_hf_model(state.model))
        refs = getattr(self.policy, 'reference_losses', None)
        if masks is None or refs is None or not hasattr(masks, 'target_num_parameters'):
            return
        message = source_reference_warning(self.policy_name, self.policy.domain_names, refs, losses,
                                           expected_params, float(masks.target_num_parameters()),
                                           where='drp_dynamic_loading.policy')
        if message and dist.get_global_rank() == 0:
            log.warning(message)

    def _metrics(self, diagnostics: dict[str, Any]) -> dict[str, float]:
        metrics: dict[str, float] = {'drp/num_warnings': float(len(diagnostics['warnings']))}
        fits = diagnostics.get('fits') or [None] * self.policy.num_domains
        for i, domain in enumerate(self.policy.domain_names):
            for key, name in (('eval_losses', 'eval_loss'), ('ema_losses', 'ema_loss'),
                              ('reference_losses', 'reference_loss'), ('excess_losses', 'excess_loss'),
                              ('q', 'mixture'), ('p_ref', 'reference_ratio')):
                values = diagnostics.get(key)
                if values is not None and values[i] is not None and math.isfinite(values[i]):
                    metrics[f'drp/{name}/{domain}'] = float(values[i])
            if fits[i] is not None:
                metrics[f'drp/fit_rmse/{domain}'] = fits[i]['rmse']
                metrics[f'drp/fit_prediction/{domain}'] = fits[i]['prediction']
        if 'fit_seconds' in diagnostics:
            metrics['drp/fit_seconds'] = float(diagnostics['fit_seconds'])
        return metrics

    # -- plots ----------------------------------------------------------------------------
    def plot_path(self, state: State) -> str | None:
        if self.plot_folder is None:
            return None
        return os.path.join(self.plot_folder.format(run_name=state.run_name), _PLOT_NAME)

    def render_plot(self, title: str = '') -> np.ndarray | None:
        """The trajectories as an RGB image (H, W, 3) uint8: eval / reference loss, excess loss,
        mixture q, reference ratio p_R and the expected parameter count (None before any update)."""
        if not self.trajectory or self.policy is None:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(15, 8))
        canvas = FigureCanvasAgg(figure)
        steps = [point['step'] for point in self.trajectory]
        panels = (('eval_losses', 'eval loss (solid) / reference loss (dashed)'), ('excess_losses', 'excess loss'),
                  ('q', 'mixture q'), ('p_ref', 'reference ratio p_R'))
        axes = figure.subplots(2, 3, sharex=True).ravel()
        for ax, (key, panel_title) in zip(axes, panels):
            for i, domain in enumerate(self.policy.domain_names):
                values = [np.nan if p.get(key) is None or p[key][i] is None else p[key][i] for p in self.trajectory]
                (line,) = ax.plot(steps, values, label=domain)
                if key == 'eval_losses':
                    refs = [np.nan if p.get('reference_losses') is None or p['reference_losses'][i] is None else
                            p['reference_losses'][i] for p in self.trajectory]
                    ax.plot(steps, refs, linestyle='--', color=line.get_color())
            ax.set_title(panel_title)
            ax.set_xlabel('step')
        size_ax = axes[4]
        size_ax.plot(steps, [p.get('expected_params', np.nan) for p in self.trajectory], label='expected')
        target = getattr(self.policy, 'target_params', None)
        if target:
            size_ax.axhline(target, linestyle='--', color='gray', label='target')
        size_ax.set_title('expected parameter count P')
        size_ax.set_xlabel('step')
        size_ax.legend(fontsize='small')
        axes[5].axis('off')
        axes[0].legend(fontsize='small')
        figure.suptitle(f'drp_dynamic_loading ({self.policy_name}) {title}')
        figure.tight_layout()
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

    def _write_plot(self, state: State, logger: Logger | None = None) -> None:
        """Refresh the PNG (each checkpoint event with a new update); with ``logger`` (the end of
        training) also send the image to the loggers, once per new update."""
        if not self.trajectory or dist.get_global_rank() != 0:
            return
        step = int(self.trajectory[-1]['step'])
        path = self.plot_path(state)
        write_file = path is not None and step != self._last_written_step
        send = self.log_images and logger is not None and step != self._last_logged_step
        if not (write_file or send):
            return
        image = self.render_plot(f'- {state.run_name}')
        if write_file:
            from matplotlib.image import imsave
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            imsave(path, image)
            self._last_written_step = step
        if send:
            logger.log_images(image, name='drp/mixture_trajectories', channels_last=True, step=step)
            self._last_logged_step = step

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._write_plot(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._write_plot(state)

    def iteration_checkpoint(self, state: State, logger: Logger) -> None:
        self._write_plot(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._write_plot(state, logger)

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """One JSON string: a sharded checkpoint (DCP) is loaded into the structure of the fresh run's state, which
        has no trajectory and no fits yet, so nested values would not be found."""
        policy_state = self.policy.state_dict() if self.policy is not None else self._pending_state
        return {'json': json.dumps({'policy_state': policy_state,
                                    'trajectory': [dict(point) for point in self.trajectory],
                                    # what the pre-flight compares with a resumed run's config (resume_checks.py)
                                    'policy_config': self.policy_config, 'loss_metric': self.loss_metric})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if 'json' in state:  # checkpoints before the JSON string hold the mapping itself
            state = json.loads(state['json'])
        self.trajectory = [dict(point) for point in state.get('trajectory', [])]
        policy_state = state.get('policy_state')
        if policy_state is None:
            return
        if self.policy is not None:
            self.policy.load_state_dict(policy_state)
        else:
            self._pending_state = policy_state  # applied once the policy is built against the dataset
