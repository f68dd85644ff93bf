"""The drp_dynamic_loading callback: a tiny real Composer run, config validation, rank agreement, resumption."""

from __future__ import annotations

import copy
import datetime
import os
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed
from composer.core import Evaluator, Time
from composer.loggers import InMemoryLogger, LoggerDestination
from composer.metrics.nlp import LanguageCrossEntropy
from composer.models import ComposerModel
from composer.trainer import Trainer
from conftest import run_forked
from torch.utils.data import DataLoader, IterableDataset

from drp_foundry.composer.dynamic_loading import DynamicLoading
from drp_foundry.pruning.mask_module import NoSizeTermsError

DOMAINS = ['flat', 'cycle', 'noise']
VOCAB, SEQ, BATCH = 16, 12, 4


def domain_sample(domain: int, index: int) -> torch.Tensor:
    """'flat' repeats one token, 'cycle' counts modulo the vocab, 'noise' is uniform: easy, medium, hard."""
    generator = torch.Generator().manual_seed(1000 * domain + index)
    start = int(torch.randint(VOCAB, (1,), generator=generator))
    if domain == 0:
        return torch.full((SEQ,), start)
    if domain == 1:
        return (start + torch.arange(SEQ)) % VOCAB
    return torch.randint(VOCAB, (SEQ,), generator=generator)


class FakeMixtureDataset(IterableDataset):
    """Honours the scheduler contract of docs/DESIGN.md (lag 0, one process)."""

    def __init__(self, proportions, names=DOMAINS):
        self.domain_names = list(names)
        self.segments = [(0, np.asarray(proportions, dtype=np.float64))]  # (first batch, q)
        self.calls: list[tuple[int, list[float]]] = []
        self.start_sample = 0

    @property
    def proportions(self):
        return self.segments[-1][1].copy()

    def set_proportions(self, p, at_batch):
        self.calls.append((int(at_batch), np.asarray(p).tolist()))
        self.segments.append((int(at_batch), np.asarray(p, dtype=np.float64)))

    def _q_at(self, batch):
        return [q for start, q in self.segments if start <= batch][-1]

    def samples_per_domain(self, at_batch):
        return sum(BATCH * self._q_at(b) for b in range(at_batch)) if at_batch else np.zeros(len(self.domain_names))

    def __iter__(self):
        index = self.start_sample
        while True:
            q = self._q_at(index // BATCH)
            domain = int(np.searchsorted(np.cumsum(q), np.random.default_rng(index).random()))
            yield {'input_ids': domain_sample(min(domain, len(q) - 1), index)}
            index += 1

    def state_dict(self, num_samples, from_beginning):
        return {'sample': num_samples, 'segments': [(s, q.tolist()) for s, q in self.segments]}

    def load_state_dict(self, state):
        self.start_sample = state['sample']
        self.segments = [(s, np.asarray(q)) for s, q in state['segments']]


class TinyLM(ComposerModel):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, batch):
        return self.head(self.embed(batch['input_ids']))

    def loss(self, outputs, batch):
        return torch.nn.functional.cross_entropy(outputs[:, :-1].reshape(-1, VOCAB), batch['input_ids'][:, 1:].reshape(-1))

    def get_metrics(self, is_train=False):
        return {'LanguageCrossEntropy': LanguageCrossEntropy()}

    def eval_forward(self, batch, outputs=None):
        return outputs if outputs is not None else self.forward(batch)

    def update_metric(self, batch, outputs, metric):
        metric.update(outputs[:, :-1].contiguous(), batch['input_ids'][:, 1:].contiguous())


def evaluators():
    return [Evaluator(label=f'eval/{name}', metric_names=['LanguageCrossEntropy'],
                      dataloader=DataLoader([{'input_ids': domain_sample(d, 10_000 + i)} for i in range(8)],
                                            batch_size=4))
            for d, name in enumerate(DOMAINS)]


def make_trainer(callback, dataset, tmp_path, max_duration='12ba', **kwargs):
    model = TinyLM()
    return Trainer(model=model, train_dataloader=DataLoader(dataset, batch_size=BATCH),
                   eval_dataloader=evaluators(), eval_interval='2ba', max_duration=max_duration,
                   optimizers=torch.optim.SGD(model.parameters(), lr=0.5), callbacks=[callback], device='cpu', progress_bar=False, log_to_console=False,
                   run_name='tiny', save_folder=str(tmp_path / 'ckpt'), save_interval='6ba', save_overwrite=True,
                   seed=17, **kwargs)


def test_tiny_trainer_run_moves_weight_to_hardest_domain_logs_and_plots(tmp_path):
    dataset = FakeMixtureDataset([0.4, 0.4, 0.2])
    callback = DynamicLoading(policy={'name': 'dro', 'reference_losses': {'flat': 0.0, 'cycle': 0.0, 'noise': 0.0},
                                      'rho': 0.1}, plot_folder=str(tmp_path / '{run_name}' / 'plots'))
    memory, images = InMemoryLogger(), ImageRecorder()
    trainer = make_trainer(callback, dataset, tmp_path, loggers=[memory, images])
    trainer.fit()
    # one update after each eval (every 2 batches; Composer evaluates again at FIT_END only if due)
    assert [step for step, _ in dataset.calls][:6] == [2, 4, 6, 8, 10, 12]
    q = np.array(dataset.calls[-1][1])
    assert q.sum() == pytest.approx(1.0)
    assert np.argmax(q / np.array([0.4, 0.4, 0.2])) == DOMAINS.index('noise')  # the largest loss
    for key in ('drp/mixture/noise', 'drp/eval_loss/flat', 'drp/excess_loss/cycle', 'drp/reference_ratio/flat',
                'drp/reference_loss/noise'):
        assert key in memory.data, key
    assert memory.data['drp/mixture/noise'][-1][1] == pytest.approx(q[2])
    assert os.path.getsize(tmp_path / 'tiny' / 'plots' / 'mixture_trajectories.png') > 1000
    # the same plot went to the loggers as an image, once: after the last update (FIT_END has nothing new)
    assert [(name, step) for name, step, _ in images.calls] == [('drp/mixture_trajectories', 12)]
    image = images.calls[-1][2]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 200
    assert image.std() > 10  # not a blank canvas
    quiet = DynamicLoading(policy={'name': 'constant'}, plot_folder=None, log_images=False)
    recorder = ImageRecorder()
    make_trainer(quiet, FakeMixtureDataset([0.4, 0.4, 0.2]), tmp_path / 'quiet', max_duration='4ba',
                 loggers=[recorder]).fit()
    assert recorder.calls == []


class ImageRecorder(LoggerDestination):
    """An in-memory logger destination that keeps the images it is sent."""

    def __init__(self):
        self.calls = []

    def log_images(self, images, name='Images', channels_last=False, step=None, *args, **kwargs):
        assert channels_last
        self.calls.append((name, step, np.asarray(images)))


def test_constant_policy_run_keeps_the_mixture(tmp_path):
    dataset = FakeMixtureDataset([0.4, 0.4, 0.2])
    trainer = make_trainer(DynamicLoading(policy={'name': 'constant'}, plot_folder=None), dataset, tmp_path,
                           max_duration='4ba')
    trainer.fit()
    assert dataset.calls and all(q == [0.4, 0.4, 0.2] for _, q in dataset.calls)


def test_resumed_trainer_makes_the_same_updates(tmp_path):
    def callback():
        return DynamicLoading(policy={'name': 'drpruning', 'reference_losses': [0.5, 1.0, 2.0], 'eval_loss_ema': 0.5,
                                      'fit_start_fraction': 0.0, 'history_start_fraction': 0.0, 'min_fit_points': 3,
                                      'ratio_start_fraction': 0.0}, plot_folder=None)

    full = FakeMixtureDataset([0.4, 0.4, 0.2])
    make_trainer(callback(), full, tmp_path).fit()  # saves checkpoints at batches 6 and 12
    resumed = FakeMixtureDataset([0.4, 0.4, 0.2])
    trainer = make_trainer(callback(), resumed, tmp_path / 'resumed',
                           load_path=str(tmp_path / 'ckpt' / 'ep0-ba6-rank0.pt'))
    trainer.fit()
    steps = [step for step, _ in full.calls]
    assert steps[:6] == [2, 4, 6, 8, 10, 12]
    assert [step for step, _ in resumed.calls] == steps[3:]
    np.testing.assert_array_equal(np.array([q for _, q in resumed.calls]), np.array([q for _, q in full.calls[3:]]))
    assert not np.allclose(full.calls[-1][1], [0.4, 0.4, 0.2])  # the updates did change the mixture


# -- validation before training -------------------------------------------------------------------
def fake_state(dataset, losses=None, batch=10, max_duration='100ba', labels=None, model=None):
    metrics = {}
    for name, loss in zip(DOMAINS, losses or []):
        # a computed metric as Composer leaves it after EVAL_END (already reduced across ranks)
        metric = SimpleNamespace(compute=lambda loss=loss: torch.tensor(loss, dtype=torch.float64))
        metrics[f'eval/{name}'] = {'LanguageCrossEntropy': metric}
    return SimpleNamespace(
        train_dataloader=SimpleNamespace(dataset=dataset), eval_metrics=metrics,
        timestamp=SimpleNamespace(batch=Time.from_timestring(f'{batch}ba')),
        max_duration=Time.from_timestring(max_duration), dataloader_len=None, run_name='fake',
        evaluators=[SimpleNamespace(label=f'eval/{n}') for n in (labels or DOMAINS)],
        model=model if model is not None else torch.nn.Linear(3, 2))


@pytest.mark.parametrize('kwargs,dataset_names,match', [
    (dict(policy={'name': 'dro', 'reference_losses': [1, 1, 1]}, domain_names=['flat', 'noise', 'cycle']), DOMAINS,
     'domain_names'),
    (dict(policy={'name': 'constant'}, reference_ratio=[0.5, 0.5]), DOMAINS, 'reference_ratio'),
    (dict(policy={'name': 'constant'}, reference_ratio=[0.2, 0.4, 0.4]), DOMAINS, 'reference_ratio'),
    (dict(policy={'name': 'dro', 'reference_losses': {'flat': 1.0, 'cycle': 1.0}}), DOMAINS, 'reference_losses'),
])
def test_config_mismatch_with_dataset_names_the_key(kwargs, dataset_names, match):
    callback = DynamicLoading(**kwargs)
    with pytest.raises(ValueError, match=match):
        callback.before_load(fake_state(FakeMixtureDataset([0.4, 0.4, 0.2], dataset_names), batch=0), None)


def test_bad_keys_fail_at_construction():
    with pytest.raises(ValueError, match='unknown policy .doremi'):
        DynamicLoading(policy={'name': 'doremi'})
    with pytest.raises(ValueError, match="'smoothing'"):
        DynamicLoading(policy={'name': 'dro', 'reference_losses': [1, 1, 1], 'smoothing': 1e-4})
    with pytest.raises(ValueError, match='reference_losses'):
        DynamicLoading(policy={'name': 'sheared'})
    with pytest.raises(ValueError, match='rho'):  # value checks run before the domains are known, too
        DynamicLoading(policy={'name': 'dro', 'reference_losses': [1, 1, 1], 'rho': -0.1})
    with pytest.raises(ValueError, match='rho'):
        DynamicLoading(policy={'name': 'dro', 'reference_losses': [1, 1, 1], 'rho': -0.1}, domain_names=DOMAINS,
                       reference_ratio=[0.4, 0.4, 0.2])
    with pytest.raises(ValueError, match='needs `name`'):
        DynamicLoading(policy={'rho': 0.1})
    with pytest.raises(ValueError, match="unknown keys \\['rhoo'\\]"):
        DynamicLoading(policy={'name': 'dro', 'reference_losses': [1, 1, 1]}, rhoo=0.1)


def test_old_flat_keys_are_refused_with_the_new_form():
    with pytest.raises(ValueError, match=r'`policy: \{name: dro, reference_losses: \[1, 2, 3\], rho: 0.2\}`'):
        DynamicLoading(policy='dro', reference_losses=[1, 2, 3], rho=0.2)
    with pytest.raises(ValueError, match=r'`policy: \{name: constant\}`'):
        DynamicLoading(policy='constant')
    with pytest.raises(ValueError, match=r'`policy: \{name: drpruning, eval_loss_ema: 0.5\}`'):
        DynamicLoading(ema_weight=0.5)
    from omegaconf import OmegaConf
    from_yaml = DynamicLoading(policy=OmegaConf.create({'name': 'dro', 'reference_losses': {'flat': 1.0, 'cycle': 2.0,
                                                                                           'noise': 3.0}}))
    assert from_yaml.policy_config == {'name': 'dro', 'reference_losses': {'flat': 1.0, 'cycle': 2.0, 'noise': 3.0}}


def test_missing_eval_loaders_tokens_duration_and_wrong_dataset_are_refused():
    dataset = FakeMixtureDataset([0.4, 0.4, 0.2])
    with pytest.raises(ValueError, match="no eval loader labelled \\['noise'\\]"):
        DynamicLoading(policy={'name': 'constant'}).fit_start(fake_state(dataset, labels=['flat', 'cycle']), None)
    with pytest.raises(ValueError, match='max_duration'):
        DynamicLoading(policy={'name': 'constant'}).before_load(fake_state(dataset, max_duration='1000tok'), None)
    with pytest.raises(ValueError, match='mixture'):
        DynamicLoading(policy={'name': 'constant'}).before_load(fake_state(object()), None)


def test_expected_and_target_params_come_from_the_mask_module():
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from drp_foundry.composer.mask_learner import apply_mask_learner

    hf_model = LlamaForCausalLM(tiny_llama_config())
    masks = apply_mask_learner(hf_model, {'layers': 2, 'hidden': 32, 'heads': 2, 'intermediate': 64})
    model = SimpleNamespace(model=hf_model)
    callback = DynamicLoading(policy={'name': 'drpruning', 'reference_losses': [1.0, 1.0, 1.0]}, plot_folder=None)
    state = fake_state(FakeMixtureDataset([0.4, 0.4, 0.2]), losses=[1.0, 2.0, 3.0], model=model)
    callback.before_load(state, None)
    assert callback.policy.target_params == masks.target_num_parameters() and callback.policy.total_steps == 100
    with pytest.raises(NoSizeTermsError, match='training forward'):  # not the local (maybe sharded) parameters
        callback._expected_params(state)
    hf_model.train()
    hf_model(torch.randint(0, 512, (1, 8)))  # a training forward records the size terms (FSDP-safe read)
    with torch.no_grad():
        masks.log_alpha('hidden').fill_(-3.0)  # changes the live value, not the recorded one
    assert callback._expected_params(state) == pytest.approx(float(masks.last_size_terms.num_parameters))
    assert callback._expected_params(state) != pytest.approx(float(masks.expected_num_parameters()))
    plain = DynamicLoading(policy={'name': 'constant'}, plot_folder=None)
    assert plain._expected_params(fake_state(None, model=torch.nn.Linear(3, 2))) == 8.0  # 3*2 + 2


def drive(callback, dataset, steps, seed):
    rng = np.random.default_rng(seed)
    for step in steps:
        losses = [1.0 + rng.random(), 2.0 + rng.random(), 3.0 + rng.random()]
        callback.eval_after_all(fake_state(dataset, losses, batch=step), SimpleNamespace(log_metrics=lambda m: None))


def test_callback_state_round_trip_through_torch_save(tmp_path):
    def new():
        return DynamicLoading(policy={'name': 'drpruning', 'reference_losses': [1.0, 2.0, 3.0], 'fit_start_fraction': 0.1,
                                      'ratio_start_fraction': 0.2, 'min_fit_points': 4}, plot_folder=None)

    full_dataset = FakeMixtureDataset([0.4, 0.4, 0.2])
    full = new()
    full.before_load(fake_state(full_dataset), None)
    drive(full, full_dataset, range(2, 61, 2), seed=0)

    dataset = FakeMixtureDataset([0.4, 0.4, 0.2])
    first = new()
    first.before_load(fake_state(dataset), None)
    drive(first, dataset, range(2, 31, 2), seed=0)
    torch.save(first.state_dict(), tmp_path / 'cb.pt')
    resumed = new()
    resumed.load_state_dict(torch.load(tmp_path / 'cb.pt', weights_only=True))  # plain Python values only
    resumed.before_load(fake_state(dataset), None)
    rng_state = np.random.default_rng(0)
    for _ in range(2, 31, 2):
        rng_state.random(3)  # the losses already consumed by the first half
    for step in range(32, 61, 2):
        losses = [1.0 + rng_state.random(), 2.0 + rng_state.random(), 3.0 + rng_state.random()]
        resumed.eval_after_all(fake_state(dataset, losses, batch=step), SimpleNamespace(log_metrics=lambda m: None))
    np.testing.assert_array_equal(np.array([q for _, q in dataset.calls]), np.array([q for _, q in full_dataset.calls]))
    assert len(resumed.trajectory) == len(full.trajectory) == 30


# -- two gloo ranks ---------------------------------------------------------------------------------
def _rank_main(rank, world_size, init_file, out_dir):
    """One rank (a forked child). It leaves with ``os._exit``, without tearing gloo down: destroy_process_group can
    wait for ever once the peer has exited (seen here: one rank still in it 10 minutes after its peer had left)."""
    try:
        torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                                             world_size=world_size, timeout=datetime.timedelta(seconds=120))
        dataset = FakeMixtureDataset([0.4, 0.4, 0.2])
        callback = DynamicLoading(policy={'name': 'drpruning', 'reference_losses': [1.0, 2.0, 3.0], 'fit_start_fraction': 0.1,
                                          'min_fit_points': 4}, plot_folder=None)
        callback.before_load(fake_state(dataset), None)
        rng = np.random.default_rng(rank)  # the ranks see different losses: only rank 0's may count
        if rank == 1:
            dataset.samples_per_domain = lambda at_batch: np.full(3, 7.0 * at_batch)  # and different T_i
        for step in range(2, 41, 2):
            losses = [1.0 + rng.random(), 2.0 + rng.random(), 3.0 + rng.random()]
            callback.eval_after_all(fake_state(dataset, losses, batch=step), SimpleNamespace(log_metrics=lambda m: None))
        np.save(os.path.join(out_dir, f'q{rank}.npy'), np.array([q for _, q in dataset.calls]))
        torch.save(callback.state_dict(), os.path.join(out_dir, f'state{rank}.pt'))
        torch.distributed.barrier()
    except BaseException:
        Path(out_dir, f'error{rank}.txt').write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


@pytest.mark.slow
def test_two_gloo_ranks_end_each_update_with_identical_proportions(tmp_path):
    exit_codes = run_forked(_rank_main, [(rank, 2, str(tmp_path / 'init'), str(tmp_path)) for rank in range(2)],
                            timeout=180)
    for rank, exit_code in enumerate(exit_codes):
        error = tmp_path / f'error{rank}.txt'
        assert exit_code == 0, error.read_text() if error.exists() else f'rank {rank}: exit code {exit_code}'
    q0, q1 = np.load(tmp_path / 'q0.npy'), np.load(tmp_path / 'q1.npy')
    assert q0.shape == (20, 3)
    np.testing.assert_array_equal(q0, q1)
    assert torch.load(tmp_path / 'state0.pt', weights_only=True) == torch.load(tmp_path / 'state1.pt',
                                                                               weights_only=True)
    # and they are rank 0's updates: a single process fed rank 0's losses gives the same mixtures
    dataset = FakeMixtureDataset([0.4, 0.4, 0.2])
    single = DynamicLoading(policy={'name': 'drpruning', 'reference_losses': [1.0, 2.0, 3.0], 'fit_start_fraction': 0.1,
                                          'min_fit_points': 4}, plot_folder=None)
    single.before_load(fake_state(dataset), None)
    drive(single, dataset, range(2, 41, 2), seed=0)
    np.testing.assert_array_equal(np.array([q for _, q in dataset.calls]), q0)
    assert copy.deepcopy(single.policy.q).tolist() == q0[-1].tolist()
