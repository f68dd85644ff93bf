"""The drp_multidomain dataset and loader: mixture, update lag, workers, ranks, resumption, formats, errors."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_forked
from scipy.stats import chisquare
from streaming import MDSWriter, Stream
from tagged_batches import read_tagged_batches
from torch.utils.data import DataLoader

from drp_foundry.data.domain_sampling import draw_domains
from drp_foundry.data.multidomain_dataset import MultiDomainStreamingDataset

DOMAIN_SIZES = {'arxiv': 120, 'book': 200, 'wiki': 90}
NAMES = list(DOMAIN_SIZES)
SEQ = 8
TAG = 100_000  # token value = domain * TAG + position in domain: a sample names itself


def write_domain(folder: Path, domain_index: int, n: int, seq: int = SEQ) -> None:
    with MDSWriter(out=str(folder), columns={'tokens': 'ndarray:int32'}, size_limit=600) as writer:
        for i in range(n):
            writer.write({'tokens': np.full(seq, domain_index * TAG + i, dtype=np.int32)})


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('mds')
    for d, (name, n) in enumerate(DOMAIN_SIZES.items()):
        write_domain(root / name / 'train', d, n)
        write_domain(root / name / 'eval', d, 10)
    return root


def make_dataset(root: Path, proportions=(0.5, 0.3, 0.2), batch_size=4, num_workers=0, **kwargs):
    streams = [Stream(local=str(root / name), split='train') for name in NAMES]
    return MultiDomainStreamingDataset(NAMES, streams, proportions, max_seq_len=SEQ,
                                       device_batch_size=batch_size, num_workers=num_workers, **kwargs)


def run(dataset, num_batches, num_workers=0, changes=None, context=None, settle_s=0.0, first_batch=0):
    """(domain_idx, sample tag) per batch, with persistent workers (``tagged_batches.read_tagged_batches``)."""
    return read_tagged_batches(dataset, num_batches, num_workers, changes, context, settle_s, first_batch)


def test_samples_are_valid_tokens_of_their_domain(data_root):
    batches = run(make_dataset(data_root), 30)
    domains, tags = batches[..., 0].ravel(), batches[..., 1].ravel()
    np.testing.assert_array_equal(tags // TAG, domains)
    sizes = np.array(list(DOMAIN_SIZES.values()))
    assert np.all(tags % TAG < sizes[domains])


def test_frequencies_follow_proportions_before_and_after_a_change_with_two_workers(data_root):
    before, after = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.25, 0.65])
    dataset = make_dataset(data_root, before, batch_size=8, num_workers=2)
    assert dataset.update_lag_batches == 4  # num_workers * prefetch_factor
    c = 40
    batches = run(dataset, 100, num_workers=2, changes={c: after}, settle_s=0.2)
    effective = c + dataset.update_lag_batches
    domains = batches[..., 0]
    counts_before = np.bincount(domains[:effective].ravel(), minlength=3)
    counts_after = np.bincount(domains[effective:].ravel(), minlength=3)
    assert chisquare(counts_before, counts_before.sum() * before).pvalue > 1e-3
    assert chisquare(counts_after, counts_after.sum() * after).pvalue > 1e-3
    # the new mixture is really different from the old one on the same samples
    assert chisquare(counts_after, counts_after.sum() * before).pvalue < 1e-6
    # every sample's domain is exactly the pure schedule with the switch at the stated batch
    gbs = dataset.global_batch_size
    expected = draw_domains(dataset.shuffle_seed, np.array([0, effective * gbs]), np.stack([before, after]),
                            0, 100 * gbs)
    np.testing.assert_array_equal(domains.ravel(), expected)
    np.testing.assert_array_equal(dataset.samples_per_domain(100), np.bincount(expected, minlength=3))
    np.testing.assert_array_equal(dataset.proportions, after)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_change_takes_effect_exactly_at_the_stated_batch(data_root, num_workers):
    dataset = make_dataset(data_root, [1.0, 0.0, 0.0], num_workers=num_workers)
    c = 9
    assert dataset.update_lag_batches == num_workers * 2  # num_workers * prefetch_factor
    batches = run(dataset, 25, num_workers=num_workers, changes={c: [0.0, 0.0, 1.0]}, settle_s=0.2)
    effective = c + dataset.update_lag_batches  # the batch the dataset promises
    per_batch = batches[..., 0]
    assert np.all(per_batch[:effective] == 0)
    assert np.all(per_batch[effective:] == 2)


def test_same_explicit_lag_gives_identical_sequences_for_0_2_fork_1_spawn_workers(data_root):
    changes = {5: [0.1, 0.1, 0.8], 12: [0.6, 0.4, 0.0]}
    runs = {}
    for num_workers, context in [(0, None), (2, 'fork'), (1, 'spawn')]:
        dataset = make_dataset(data_root, num_workers=num_workers, update_lag_batches=4)
        runs[num_workers] = run(dataset, 24, num_workers=num_workers, changes=changes, context=context)
    np.testing.assert_array_equal(runs[1], runs[0])
    np.testing.assert_array_equal(runs[2], runs[0])


def test_domains_run_out_into_reshuffled_passes_with_every_sample_once_per_pass(data_root, caplog):
    dataset = make_dataset(data_root, [0.0, 0.0, 1.0], batch_size=9)  # wiki: 90 samples
    tags = run(dataset, 30, num_workers=0)[..., 1].ravel() % TAG
    passes = tags.reshape(3, 90)
    for p in passes:
        assert sorted(p.tolist()) == list(range(90))
    assert not np.array_equal(passes[0], passes[1])
    with caplog.at_level('INFO', logger='drp_foundry.data.multidomain_dataset'):
        dataset.samples_per_domain(30)
    assert "domain 'wiki' used all 90 samples" in caplog.text


@pytest.mark.parametrize('resume_workers', [0, 2])
def test_resume_from_state_dict_continues_with_the_uninterrupted_samples(data_root, resume_workers):
    # a change before the checkpoint, one pending at it (not yet in effect), one after resuming
    changes_before = {3: [0.2, 0.2, 0.6], 10: [0.7, 0.1, 0.2]}
    changes_after = {14: [0.3, 0.3, 0.4]}
    k, total = 10, 20
    uninterrupted = run(make_dataset(data_root, num_workers=0, update_lag_batches=4), total,
                        changes={**changes_before, **changes_after})

    first = make_dataset(data_root, num_workers=2, update_lag_batches=4)
    head = run(first, k, num_workers=2, changes=changes_before)
    first.set_proportions(changes_before[10], at_batch=10)
    state = first.state_dict(num_samples=k * first.global_batch_size, from_beginning=True)
    json.dumps(state)  # plain data, O(domains + pending changes)
    assert state['domain_counts'] == np.bincount(head[..., 0].ravel(), minlength=3).tolist()
    assert len(state['segment_starts']) == 2  # the one in force and the pending one

    resumed = make_dataset(data_root, num_workers=resume_workers, update_lag_batches=4)
    resumed.load_state_dict(state)
    tail = run(resumed, total - k, num_workers=resume_workers, changes=changes_after, first_batch=k)
    np.testing.assert_array_equal(np.concatenate([head, tail]), uninterrupted)


def test_state_dict_relative_to_resume_point(data_root):
    dataset = make_dataset(data_root)
    state = dataset.state_dict(8, True)
    dataset.load_state_dict(state)
    assert dataset.state_dict(4, from_beginning=False)['sample_index'] == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, root: str, out: str, batch_size: int, num_batches: int, change_at: int) -> None:
    """One rank of a real two-process gloo world (a forked child; env as torchrun sets it)."""
    try:
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2',
                          RANK=str(rank), LOCAL_RANK=str(rank))
        torch.distributed.init_process_group('gloo')
        dataset = make_dataset(Path(root), batch_size=batch_size, num_workers=1)
        assert (dataset.rank, dataset.world_size) == (rank, 2)
        # Rank 1 asks for another mixture: set_proportions broadcasts rank 0's, so ranks agree.
        mixture = [0.1, 0.1, 0.8] if rank == 0 else [0.8, 0.1, 0.1]
        batches = run(dataset, num_batches, num_workers=1, changes={change_at: mixture})
        np.save(out, batches)
        torch.distributed.barrier()  # no destroy_process_group: gloo's teardown can wait for ever once the peer has
        # gone, and the forked child ends with os._exit after this returns
    except BaseException:
        Path(out + '.error').write_text(traceback.format_exc())
        raise


def test_two_gloo_ranks_draw_disjoint_samples_on_one_domain_schedule(data_root, tmp_path):
    batch_size, num_batches, change_at = 3, 16, 6
    port = _free_port()
    outs = [str(tmp_path / f'rank{rank}.npy') for rank in range(2)]
    exit_codes = run_forked(rank_main, [(rank, port, str(data_root), outs[rank], batch_size, num_batches, change_at)
                                        for rank in range(2)], timeout=120)
    for exit_code, out in zip(exit_codes, outs):
        error = Path(out + '.error')
        assert exit_code == 0, error.read_text() if error.exists() else f'exit code {exit_code}'
    per_rank = [np.load(out) for out in outs]
    tags = [set(r[..., 1].ravel().tolist()) for r in per_rank]
    sizes = sum(DOMAIN_SIZES.values())
    assert num_batches * batch_size * 2 < sizes  # no pass wraps, so every sample must differ
    assert not tags[0] & tags[1]
    assert len(tags[0]) == len(tags[1]) == num_batches * batch_size
    # Rank r's n-th sample is global sample k = 2n + r: interleaving the ranks must give the one
    # global schedule, identical to a single process drawing global batches of 2 * batch_size.
    interleaved = np.stack(per_rank, axis=2).reshape(num_batches, 2 * batch_size, 2)
    single = make_dataset(data_root, batch_size=2 * batch_size, num_workers=1, rank=0, world_size=1)
    reference = run(single, num_batches, num_workers=1, changes={change_at: [0.1, 0.1, 0.8]})
    np.testing.assert_array_equal(interleaved, reference)


def test_reads_legacy_bytes_and_llmfoundry_concat_token_shards(tmp_path, tiny_tokenizer, sample_dir):
    from conftest import read_texts
    from llmfoundry.data.data import ConcatTokensDataset

    # LLM-Foundry's own writer path (convert_dataset_hf --concat_tokens): ConcatTokensDataset -> MDSWriter.
    texts = [{'text': t} for t in read_texts(sample_dir / 'wiki.jsonl', limit=20)]
    concat = ConcatTokensDataset(hf_dataset=texts, tokenizer=tiny_tokenizer, max_length=32,
                                 bos_text='', eos_text=tiny_tokenizer.eos_token, no_wrap=False)
    written = []
    with MDSWriter(out=str(tmp_path / 'foundry' / 'train'), columns={'tokens': 'ndarray:int32'}) as writer:
        for sample in concat:
            writer.write(sample)
            written.append(sample['tokens'].astype(np.int64))
    # Legacy shards: tokens stored as raw bytes, decoded with token_encoding_type.
    legacy = [np.arange(i, i + 32, dtype=np.int64) for i in range(25)]
    with MDSWriter(out=str(tmp_path / 'legacy' / 'train'), columns={'tokens': 'bytes'}) as writer:
        for tokens in legacy:
            writer.write({'tokens': tokens.tobytes()})
    streams = [Stream(local=str(tmp_path / name), split='train') for name in ('foundry', 'legacy')]
    dataset = MultiDomainStreamingDataset(['foundry', 'legacy'], streams, [0.5, 0.5], max_seq_len=32,
                                          device_batch_size=5, token_encoding_type='int64')
    expected = {0: {tuple(t) for t in written}, 1: {tuple(t) for t in legacy}}
    seen = 0
    for sample in zip(range(40), dataset):
        item = sample[1]
        assert item['input_ids'].dtype == torch.int64 and item['input_ids'].shape == (32,)
        assert tuple(item['input_ids'].tolist()) in expected[item['domain_idx']]
        seen += 1
    assert seen == 40 and len(written) >= 5


def test_bad_inputs_fail_before_training_naming_the_key(data_root, tmp_path):
    with pytest.raises(ValueError, match='got 2 proportions for 3 domains'):
        make_dataset(data_root, [0.5, 0.5])
    with pytest.raises(ValueError, match='sum to 0.9'):
        make_dataset(data_root, [0.5, 0.3, 0.1])
    with pytest.raises(ValueError, match="unknown: \\['cc'\\]"):
        make_dataset(data_root, {'arxiv': 0.5, 'book': 0.5, 'cc': 0.0})
    with pytest.raises(ValueError, match='update_lag_batches=1 is below'):
        make_dataset(data_root, num_workers=2, update_lag_batches=1)
    streams = [Stream(local=str(tmp_path / 'nowhere'), split='train')]
    with pytest.raises(ValueError, match="domain 'nowhere'.*missing index.json"):
        MultiDomainStreamingDataset(['nowhere'], streams, [1.0], SEQ, 2)
    with MDSWriter(out=str(tmp_path / 'empty' / 'train'), columns={'tokens': 'ndarray:int32'}):
        pass
    streams = [Stream(local=str(tmp_path / 'empty'), split='train')]
    with pytest.raises(ValueError, match=r"domains \['empty'\] have no samples"):
        MultiDomainStreamingDataset(['empty'], streams, [1.0], SEQ, 2)

    dataset = make_dataset(data_root)
    with pytest.raises(ValueError, match='must be >= 0'):
        dataset.set_proportions([0.5, 0.6, -0.1], at_batch=3)
    dataset.set_proportions([0.2, 0.2, 0.6], at_batch=5)
    with pytest.raises(ValueError, match='at_batch must not decrease'):
        dataset.set_proportions([0.2, 0.2, 0.6], at_batch=4)
    state = dataset.state_dict(8, True)
    with pytest.raises(ValueError, match='shuffle_seed'):
        make_dataset(data_root, shuffle_seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match='whole number of global batches'):
        make_dataset(data_root, batch_size=3).load_state_dict(state)
    other = dict(state, domain_names=['arxiv', 'wiki', 'book'])
    with pytest.raises(ValueError, match='same domains in the same order'):
        make_dataset(data_root).load_state_dict(other)
    with pytest.raises(RuntimeError, match='built for num_workers=0'):
        next(iter(DataLoader(make_dataset(data_root), batch_size=4, num_workers=1)))


@pytest.fixture(scope='module')
def token_root(tmp_path_factory) -> Path:
    """DATA_ROOT layout with in-vocabulary tokens (< 512) for the loader and model tests."""
    root = tmp_path_factory.mktemp('token_root')
    rng = np.random.default_rng(0)
    for name in ('code', 'prose'):
        for split, n in (('train', 40), ('eval', 6)):
            with MDSWriter(out=str(root / name / split), columns={'tokens': 'ndarray:int32'}) as writer:
                for _ in range(n):
                    writer.write({'tokens': rng.integers(2, 512, size=16).astype(np.int32)})
    return root


def _register_builder():
    from llmfoundry import registry

    from drp_foundry.composer.multidomain_dataloader import build_multidomain_dataloader

    if 'drp_multidomain' not in registry.dataloaders.get_all():
        registry.dataloaders.register('drp_multidomain', func=build_multidomain_dataloader)


def test_registered_builder_gives_text_batches_with_domain_idx_that_the_hf_model_accepts(
        token_root, tiny_tokenizer, tmp_path, llama_config):
    from llmfoundry.data.dataloader import build_dataloader
    from llmfoundry.models.hf.hf_causal_lm import ComposerHFCausalLM

    _register_builder()
    cfg = {'name': 'drp_multidomain', 'num_workers': 1, 'prefetch_factor': 2, 'persistent_workers': True,
           'pin_memory': False,
           'dataset': {'data_root': str(token_root), 'domains': ['code', 'prose'],
                       'proportions': {'code': 0.25, 'prose': 0.75}, 'max_seq_len': 16,
                       'eos_token_id': tiny_tokenizer.eos_token_id}}
    spec = build_dataloader(cfg, tiny_tokenizer, 4)
    dataset = spec.dataloader.dataset
    assert dataset.domain_names == ['code', 'prose'] and dataset.update_lag_batches == 2
    np.testing.assert_allclose(dataset.proportions, [0.25, 0.75])
    batch = next(iter(spec.dataloader))
    # the keys of LLM-Foundry's `text` loader on token samples, plus domain_idx
    assert set(batch) == {'input_ids', 'labels', 'sequence_id', 'total_tokens', 'loss_generating_tokens',
                          'domain_idx'}
    assert batch['domain_idx'].shape == (4,) and batch['input_ids'].shape == (4, 16)
    torch.testing.assert_close(batch['labels'], batch['input_ids'])  # full samples: nothing masked
    assert spec.get_num_tokens_in_batch(batch) == 4 * 16

    llama_config.save_pretrained(tmp_path / 'tiny_llama')
    tiny_tokenizer.save_pretrained(tmp_path / 'tiny_llama')
    model = ComposerHFCausalLM(tokenizer=tiny_tokenizer, pretrained_model_name_or_path=str(tmp_path / 'tiny_llama'),
                               pretrained=False, use_train_metrics=False, trust_remote_code=False)
    outputs = model(batch)
    assert torch.isfinite(model.loss(outputs, batch))


def test_builder_refuses_bad_config_before_training(token_root, tiny_tokenizer):
    from drp_foundry.composer.multidomain_dataloader import build_multidomain_dataloader

    base = {'data_root': str(token_root), 'domains': ['code', 'prose'], 'proportions': [0.5, 0.5],
            'max_seq_len': 16}
    cases = [
        (dict(base, shufle_seed=3), r"shufle_seed: unknown key for drp_multidomain\. Did you mean 'shuffle_seed'"),
        ({k: v for k, v in base.items() if k != 'proportions'}, 'train_loader.dataset.proportions is required'),
        (dict(base, domains=['code', 'poetry'], proportions=[0.5, 0.5]), "domain 'poetry'.*missing index.json"),
        (dict(base, streams={'poetry': {'local': '/x'}}), r"streams names unknown domains \['poetry'\]"),
        (dict(base, proportions=[0.5, 0.6]), 'sum to 1.1'),
        (dict(base, data_root=None), "domain 'code' has no location"),
    ]
    for dataset_cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            build_multidomain_dataloader(tiny_tokenizer, 4, dataset_cfg)


def test_domain_eval_loaders_build_stock_text_eval_loaders(token_root, tiny_tokenizer):
    from llmfoundry.utils.builders import build_eval_loaders

    from drp_foundry.composer.domain_eval_loaders import (
        DomainEvalsError,
        domain_eval_loaders,
        register_text_loader,
    )

    register_text_loader()  # drp_text (Foundry's text loader under the shm lock), as the config transform does
    entry = {'name': 'drp_domain_evals', 'data_root': str(token_root), 'max_seq_len': 16}
    configs = domain_eval_loaders({**entry, 'domains': ['code', 'prose']}, {})
    assert [c['label'] for c in configs] == ['code', 'prose']
    evaluators = build_eval_loaders(configs, tiny_tokenizer, 3)
    assert [e.label for e in evaluators] == ['eval/code', 'eval/prose']
    batches = list(evaluators[0].dataloader.dataloader)
    assert sum(b['input_ids'].shape[0] for b in batches) == 6  # the whole eval split, in order
    with pytest.raises(DomainEvalsError, match="no MDS eval split for domain 'poetry'"):
        domain_eval_loaders({**entry, 'domains': ['poetry']}, {})


def test_composer_checkpoint_resume_replays_the_uninterrupted_batches(token_root, tiny_tokenizer, tmp_path,
                                                                    llama_config):
    """Through Composer's own Trainer: state_dict at save, load_state_dict at load, another worker count."""
    from composer import Callback, Event, Trainer
    from llmfoundry.models.hf.hf_causal_lm import ComposerHFCausalLM

    from drp_foundry.composer.multidomain_dataloader import build_multidomain_dataloader

    llama_config.save_pretrained(tmp_path / 'model')
    tiny_tokenizer.save_pretrained(tmp_path / 'model')

    class RecordAndReweight(Callback):
        def __init__(self):
            self.seen = []

        def run_event(self, event, state, logger):
            if event == Event.AFTER_DATALOADER:
                self.seen.append(state.batch['input_ids'].tolist())
            if event == Event.BATCH_END and int(state.timestamp.batch) == 2:
                state.train_dataloader.dataset.set_proportions([0.9, 0.1], at_batch=2)

    def fit(run_name, num_workers, load_path=None):
        spec = build_multidomain_dataloader(
            tiny_tokenizer, 2, {'data_root': str(token_root), 'domains': ['code', 'prose'],
                                'proportions': [0.2, 0.8], 'max_seq_len': 16},
            num_workers=num_workers, pin_memory=False)
        model = ComposerHFCausalLM(tokenizer=tiny_tokenizer, pretrained_model_name_or_path=str(tmp_path / 'model'),
                                   pretrained=False, use_train_metrics=False, trust_remote_code=False)
        recorder = RecordAndReweight()
        trainer = Trainer(model=model, train_dataloader=spec, max_duration='8ba', callbacks=[recorder],
                          optimizers=torch.optim.SGD(model.parameters(), lr=0.0), save_folder=str(tmp_path / run_name),
                          save_interval='4ba', load_path=load_path, progress_bar=False, log_to_console=False,
                          device='cpu', seed=1)
        trainer.fit()
        trainer.close()
        return recorder.seen

    # the change at batch 2 takes effect at batch 2 + 2 * 2 = 6, after the checkpoint at batch 4
    full = fit('full', num_workers=2)
    resumed = fit('resumed', num_workers=1, load_path=str(tmp_path / 'full' / 'ep0-ba4-rank0.pt'))
    assert resumed == full[4:]
