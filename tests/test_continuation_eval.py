"""Continuation benchmark: builder, scorer, CLI, LLM client, Composer callback, lm-eval tasks."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
from conftest import read_texts, tiny_llama_config

from drp_foundry.commands import eval as cli
from drp_foundry.eval.continuation_items import (
    LLM_VARIANT,
    OFFLINE_VARIANT,
    LLMJudgeVerifier,
    LLMWrongContinuationWriter,
    ModelVerifier,
    OtherDocumentWrongWriter,
    build_items,
    keep_largest_margins,
    read_domain_documents,
    sentence_pairs,
    split_segments,
)
from drp_foundry.eval.continuation_scorer import (
    ContinuationItem,
    ContinuationReport,
    continuation_log_likelihoods,
    read_items,
    score_items,
    write_items,
)
from drp_foundry.eval.llm_client import OpenAICompatibleClient

HELD_OUT_FRACTION = 0.3  # the tail of every sample document is held out; the model trains on the rest
DOCUMENTS_PER_DOMAIN = 60
ITEMS_PER_DOMAIN = 120
TRAIN_STEPS, SEQ_LEN, BATCH = 300, 128, 16


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def split_sample(sample_dir, tmp_path_factory):
    """(train text per domain, folder of held-out <domain>.jsonl)."""
    held_dir = tmp_path_factory.mktemp('heldout')
    train = {}
    for jsonl in sorted(sample_dir.glob('*.jsonl')):
        docs = read_texts(jsonl, limit=DOCUMENTS_PER_DOMAIN)
        cuts = [int(len(d) * (1 - HELD_OUT_FRACTION)) for d in docs]
        train[jsonl.stem] = ''.join(d[:c] for d, c in zip(docs, cuts))[:300_000]
        with open(held_dir / jsonl.name, 'w') as f:
            for d, c in zip(docs, cuts):
                f.write(json.dumps({'text': d[c:]}) + '\n')
    return train, held_dir


@pytest.fixture(scope='module')
def domains(split_sample):
    return sorted(split_sample[0])


@pytest.fixture(scope='module')
def offline_items(split_sample):
    documents = read_domain_documents([split_sample[1]])
    return build_items(documents, OtherDocumentWrongWriter(documents), per_domain=ITEMS_PER_DOMAIN, seed=0)


@pytest.fixture(scope='module')
def swapped_items(split_sample):
    documents = read_domain_documents([split_sample[1]])
    return build_items(documents, OtherDocumentWrongWriter(pairing='swap'), per_domain=ITEMS_PER_DOMAIN, seed=0)


@pytest.fixture(scope='module')
def untrained_model():
    """The same architecture at random initialisation."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope='module')
def trained_model(split_sample, tiny_tokenizer):
    """The same tiny Llama trained for a few hundred CPU steps on the sample's training part."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    tokens = [torch.tensor(tiny_tokenizer.encode(text)) for text in split_sample[0].values()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for step in range(TRAIN_STEPS):
        rows = []
        for b in range(BATCH):
            domain_tokens = tokens[(step * BATCH + b) % len(tokens)]
            start = int(torch.randint(0, len(domain_tokens) - SEQ_LEN, (1,), generator=generator))
            rows.append(domain_tokens[start:start + SEQ_LEN])
        batch = torch.stack(rows)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


# ----------------------------------------------------------------------------- builder


def test_pairs_keep_the_separating_whitespace_and_the_link():
    text = ('The pump failed in March. Because the pump failed, the field flooded.\n'
            'Unrelated closing remark about lunch.')
    segments = split_segments(text)
    assert [s.text for s in segments] == ['The pump failed in March.', 'Because the pump failed, the field flooded.',
                                          'Unrelated closing remark about lunch.']
    assert [s.gap_before for s in segments] == ['', ' ', '\n']
    pairs = sentence_pairs(text, min_chars=10)
    # the second pair shares no content word and opens with no connective: dropped
    assert pairs == [('The pump failed in March.', ' Because the pump failed, the field flooded.')]
    assert len(sentence_pairs(text, min_chars=10, require_link=False)) == 2
    (context, right), _ = sentence_pairs(text, min_chars=10, continuation_words=2, require_link=False)
    assert right == ' field flooded.'
    assert context + right == text.split('\n')[0]


def test_offline_build_on_shared_sample(offline_items, swapped_items, domains, split_sample, tmp_path):
    for built in (offline_items, swapped_items):
        counts = {d: sum(i.domain == d for i in built) for d in domains}
        assert set(counts.values()) == {ITEMS_PER_DOMAIN}, counts
        for item in built:
            assert item.meta['variant'] == OFFLINE_VARIANT and item.meta['weaker_variant'] is True
            assert item.meta['wrong_source_document'] != item.meta['source_document']
            assert item.wrong != item.right
            lead = item.right[:len(item.right) - len(item.right.lstrip())]
            assert lead and item.wrong.startswith(lead)
    # swap pairs: each continuation is right once and wrong once
    for items in ([i for i in swapped_items if i.domain == d] for d in domains):
        pairs = {}
        for item in items:
            pairs.setdefault(item.meta['swap_pair'], []).append(item)
        for first, second in pairs.values():
            assert first.wrong.strip() == second.right.strip() and second.wrong.strip() == first.right.strip()
    # deterministic given the seed (also through the CLI), different for another seed
    out = tmp_path / 'items.jsonl'
    cli.run(['build', '--data', str(split_sample[1]), '--out', str(out), '--offline',
             '--per-domain', str(ITEMS_PER_DOMAIN), '--seed', '0'])
    assert read_items(out) == offline_items
    documents = read_domain_documents([split_sample[1]])
    other = build_items(documents, OtherDocumentWrongWriter(documents), per_domain=ITEMS_PER_DOMAIN, seed=1)
    assert [i.context for i in other] != [i.context for i in offline_items]


def test_build_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        read_domain_documents([tmp_path / 'missing.jsonl'])
    bad = tmp_path / 'wiki.jsonl'
    bad.write_text('{"txt": "no text key"}\n')
    with pytest.raises(ValueError, match=r'wiki.jsonl:1: JSON object without a "text" field'):
        read_domain_documents([bad])
    one_doc = {'wiki': ['The pump failed in March. Because the pump failed, the field flooded.']}
    assert build_items(one_doc, OtherDocumentWrongWriter(one_doc), per_domain=4) == []  # no other document
    assert build_items(one_doc, OtherDocumentWrongWriter(pairing='swap'), per_domain=4) == []
    with pytest.raises(ValueError, match='pairing'):
        OtherDocumentWrongWriter(one_doc, pairing='shuffle')
    with pytest.raises(SystemExit, match='exactly one of --offline'):
        cli.run(['build', '--data', str(bad), '--out', str(tmp_path / 'x.jsonl')])


# ----------------------------------------------------------------------------- scorer


@pytest.mark.slow
def test_log_likelihood_matches_the_model_loss_and_is_batch_invariant(trained_model, tiny_tokenizer, offline_items):
    item = offline_items[0]
    context_ids = tiny_tokenizer.encode(item.context, add_special_tokens=False)
    whole = tiny_tokenizer.encode(item.context + item.right, add_special_tokens=False)
    labels = torch.tensor([[-100] * len(context_ids) + whole[len(context_ids):]])
    with torch.no_grad():
        mean_nll = trained_model(input_ids=torch.tensor([whole]), labels=labels).loss.item()
    n_scored = len(whole) - len(context_ids)
    sums, counts = continuation_log_likelihoods(trained_model, tiny_tokenizer, [(item.context, item.right)])
    assert counts[0] == n_scored
    assert sums[0] == pytest.approx(-mean_nll * n_scored, rel=1e-4)

    pairs = [(i.context, i.wrong) for i in offline_items[:9]]
    one_by_one = continuation_log_likelihoods(trained_model, tiny_tokenizer, pairs, batch_size=1)
    batched = continuation_log_likelihoods(trained_model, tiny_tokenizer, pairs, batch_size=4)
    np.testing.assert_allclose(batched[0], one_by_one[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(batched[1], one_by_one[1])


def test_normalisation_decides_between_long_and_short_continuations():
    # right: 10 tokens at -1 nat each; wrong: 3 tokens at -2 nats each
    report = ContinuationReport(domains=['a', 'b'], right_sum=np.array([-10.0, -3.0]), wrong_sum=np.array([-6.0, -9.0]),
                                right_tokens=np.array([10, 3]), wrong_tokens=np.array([3, 3]))
    assert report.correct('token_mean').tolist() == [True, True]
    assert report.correct('sum').tolist() == [False, True]  # the sum prefers the shorter wrong one
    assert report.per_domain_accuracy() == {'a': 1.0, 'b': 1.0}
    assert report.per_domain_accuracy('sum') == {'a': 0.0, 'b': 1.0}
    with pytest.raises(ValueError, match='normalization'):
        report.accuracy('per_byte')


@pytest.mark.slow
def test_trained_model_beats_untrained_on_every_domain_report(trained_model, untrained_model, tiny_tokenizer,
                                                              offline_items, domains):
    trained = score_items(trained_model, tiny_tokenizer, offline_items, batch_size=32)
    untrained = score_items(untrained_model, tiny_tokenizer, offline_items, batch_size=32)
    for report in (trained, untrained):
        assert set(report.per_domain_accuracy()) == set(domains)
        assert all(0.0 <= acc <= 1.0 for acc in report.per_domain_accuracy().values())
    print('trained', trained.summary(), '\nuntrained', untrained.summary())
    assert trained.accuracy() > untrained.accuracy() + 0.02


@pytest.mark.slow
def test_cli_scores_a_model_directory(trained_model, tiny_tokenizer, offline_items, domains, tmp_path):
    model_dir = tmp_path / 'model'
    trained_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    items_path = write_items(offline_items, tmp_path / 'items.jsonl')
    summary = cli.run(['score', str(model_dir), str(items_path), '--batch-size', '32', '--out', str(tmp_path / 'r.json')])
    in_process = score_items(trained_model, tiny_tokenizer, offline_items, batch_size=32)
    assert set(summary['per_domain']) == set(domains)
    for domain, acc in in_process.per_domain_accuracy().items():
        assert summary['per_domain'][domain] == pytest.approx(acc)
    assert json.loads((tmp_path / 'r.json').read_text())['accuracy'] == pytest.approx(in_process.accuracy())
    with pytest.raises(FileNotFoundError, match='no config.json'):
        cli.run(['score', str(tmp_path), str(items_path)])


def test_read_items_names_the_bad_line(tmp_path):
    path = tmp_path / 'items.jsonl'
    path.write_text(json.dumps({'context': 'a', 'right': ' b', 'wrong': ' c', 'domain': 'x'}) + '\n'
                    + json.dumps({'context': 'a', 'right': ' b', 'domain': 'x'}) + '\n')
    with pytest.raises(ValueError, match=r"items.jsonl:2: .*missing or empty: \['wrong'\]"):
        read_items(path)


# ----------------------------------------------------------------------------- verification


@pytest.mark.slow
def test_model_verifier_margin_is_the_mean_log_likelihood_gap(swapped_items, trained_model, tiny_tokenizer):
    items = swapped_items[:12]
    verifier = ModelVerifier(trained_model, tiny_tokenizer, batch_size=32)
    right_sum, right_count = continuation_log_likelihoods(trained_model, tiny_tokenizer,
                                                          [(i.context, i.right) for i in items], batch_size=5)
    wrong_sum, wrong_count = continuation_log_likelihoods(trained_model, tiny_tokenizer,
                                                          [(i.context, i.wrong) for i in items], batch_size=5)
    np.testing.assert_allclose(verifier.margins(items), right_sum / right_count - wrong_sum / wrong_count,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_model_verifier_keeps_exactly_the_swap_pairs_it_gets_both_ways_right(split_sample, trained_model,
                                                                             tiny_tokenizer):
    # the same candidates with and without the verifier (candidates_per_item=1): the verifier keeps
    # the whole pairs whose two margins are > 0, the largest smaller margin first
    documents = read_domain_documents([split_sample[1]])
    verifier = ModelVerifier(trained_model, tiny_tokenizer, batch_size=32)
    every = build_items(documents, OtherDocumentWrongWriter(pairing='swap'), per_domain=160)
    kept = build_items(documents, OtherDocumentWrongWriter(pairing='swap'), per_domain=160, verifier=verifier,
                       candidates_per_item=1)
    margins = verifier.margins(every)
    expected = []
    for domain in sorted(documents):
        index = [k for k, item in enumerate(every) if item.domain == domain]
        pairs = [(index[k], index[k + 1]) for k in range(0, len(index), 2)]
        both_right = [pair for pair in pairs if min(margins[pair[0]], margins[pair[1]]) > 0]
        both_right.sort(key=lambda pair: -min(margins[pair[0]], margins[pair[1]]))
        expected += [(every[k].context, every[k].right, every[k].wrong) for pair in both_right for k in pair]
    assert 0 < len(expected) < len(every)  # the model gets some pairs both ways right, not all
    assert [(i.context, i.right, i.wrong) for i in kept] == expected
    assert all(i.meta['margin'] > 0 and i.meta['verifier'] == 'model:reference_model' for i in kept)
    assert [i.meta['swap_pair'] for i in kept[::2]] == [i.meta['swap_pair'] for i in kept[1::2]]


def test_verifier_keeps_whole_pairs_up_to_per_domain_largest_smaller_margin_first():
    items = [ContinuationItem(f'c{k}', f' r{k}', f' w{k}', 'a', {'swap_pair': k // 2}) for k in range(8)]
    items.append(ContinuationItem('c8', ' r8', ' w8', 'a', {}))  # no partner: a group of one
    margins = np.array([0.5, 0.2,  # pair 0: min 0.2
                        0.9, -0.1,  # pair 1: one wrong, dropped whole
                        0.3, 0.4,  # pair 2: min 0.3
                        0.05, 0.8,  # pair 3: min 0.05
                        0.25])  # single: 0.25
    kept = keep_largest_margins(items, margins, per_domain=5, verifier_name='planted')
    # pair 2 (0.3), the single (0.25), pair 0 (0.2); pair 3 would make 7 > 5 items
    assert [i.context for i in kept] == ['c4', 'c5', 'c8', 'c0', 'c1']
    assert [i.meta['margin'] for i in kept] == [0.3, 0.4, 0.25, 0.5, 0.2]
    assert {i.meta['verifier'] for i in kept} == {'planted'}
    assert [i.context for i in keep_largest_margins(items, margins, per_domain=2, verifier_name='p')] == ['c4', 'c5']


class FakeChat:
    """A deterministic stand-in for an LLM endpoint: edits, continues and judges by rule."""

    model = 'fake-llm'

    def __init__(self):
        self.calls = []

    def complete(self, system, user, *, temperature=0.0, max_tokens=256):
        self.calls.append(system)
        if system.startswith('Change'):
            return 'It was not ' + user
        if system.startswith('Continue'):
            return f'the opposite happened in {len(user)} ways.'
        a, b = user.split('B. ', 1)
        if b.startswith('the opposite'):
            return '2'
        return '9' if len(a) % 3 else '4'  # one candidate in three has no real link


def test_llm_build_edits_then_continues_then_judges(split_sample):
    documents = read_domain_documents([split_sample[1]], max_documents=10)
    documents = {d: documents[d] for d in ('cc', 'github')}
    chat = FakeChat()
    items = build_items(documents, LLMWrongContinuationWriter(chat), per_domain=5,
                        verifier=LLMJudgeVerifier(chat), seed=3)
    assert {i.domain for i in items} == {'cc', 'github'} and len(items) <= 10
    for item in items:
        assert item.meta['variant'] == LLM_VARIANT and item.meta['weaker_variant'] is False
        assert item.meta['edited_context'] == 'It was not ' + item.context
        assert item.wrong.strip().startswith('the opposite happened')
        assert item.meta['margin'] == 7.0 and item.meta['verifier'] == 'llm_judge:fake-llm'
    assert any('code' in call for call in chat.calls) and any('passage' in call for call in chat.calls)


# ----------------------------------------------------------------------------- LLM client


def test_llm_client_reads_the_key_from_the_named_variable(monkeypatch):
    sent = []

    def transport(url, headers, payload, timeout):
        sent.append((url, headers, payload))
        if len(sent) == 1:
            raise urllib.error.HTTPError(url, 503, 'busy', {}, None)
        return {'choices': [{'message': {'content': ' reply \n'}}]}

    monkeypatch.setattr('time.sleep', lambda s: None)
    monkeypatch.setenv('MY_ENDPOINT_KEY', 'sk-test-123')
    client = OpenAICompatibleClient('http://localhost:8000/v1/', 'm', api_key_env='MY_ENDPOINT_KEY',
                                    transport=transport)
    assert client.complete('sys', 'user', temperature=0.5, max_tokens=7) == 'reply'
    url, headers, payload = sent[-1]
    assert url == 'http://localhost:8000/v1/chat/completions' and len(sent) == 2
    assert headers['Authorization'] == 'Bearer sk-test-123'
    assert payload['messages'] == [{'role': 'system', 'content': 'sys'}, {'role': 'user', 'content': 'user'}]
    assert payload['max_tokens'] == 7 and payload['temperature'] == 0.5
    assert 'sk-test-123' not in repr(client)
    monkeypatch.delenv('MY_ENDPOINT_KEY')
    client.complete('sys', 'user')
    assert 'Authorization' not in sent[-1][1]

    def unauthorised(url, headers, payload, timeout):
        raise urllib.error.HTTPError(url, 401, 'no', {}, None)

    with pytest.raises(RuntimeError, match=r'HTTP 401.*\$MY_ENDPOINT_KEY'):
        OpenAICompatibleClient('http://x/v1', 'm', api_key_env='MY_ENDPOINT_KEY', transport=unauthorised).complete('s', 'u')
    with pytest.raises(ValueError, match='base_url'):
        OpenAICompatibleClient('localhost:8000', 'm')
    with pytest.raises(ValueError, match='name of an environment variable'):
        OpenAICompatibleClient('http://x/v1', 'm', api_key_env='sk-live key')


# ----------------------------------------------------------------------------- Composer callback


def test_callback_logs_every_domain_inside_a_trainer(offline_items, tiny_tokenizer, domains, tmp_path):
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import HuggingFaceModel
    from transformers import LlamaForCausalLM

    from drp_foundry.composer.continuation_eval_callback import ContinuationEval

    items_path = write_items(offline_items, tmp_path / 'items.jsonl')
    torch.manual_seed(0)
    model = HuggingFaceModel(LlamaForCausalLM(tiny_llama_config()), tokenizer=tiny_tokenizer, use_logits=True)
    ids = torch.randint(0, 512, (8, 32))
    rows = [{'input_ids': row, 'attention_mask': torch.ones_like(row), 'labels': row} for row in ids]
    train_loader = torch.utils.data.DataLoader(rows, batch_size=2)
    eval_loader = torch.utils.data.DataLoader(rows[:2], batch_size=2)
    in_memory = InMemoryLogger()
    every_batch = ContinuationEval(str(items_path), interval=2, max_items_per_domain=6, batch_size=32)
    after_eval = ContinuationEval(str(items_path), interval='eval', max_items_per_domain=6, batch_size=32)
    trainer = Trainer(model=model, train_dataloader=train_loader, eval_dataloader=eval_loader, eval_interval='2ba',
                      max_duration='4ba', callbacks=[every_batch, after_eval], loggers=[in_memory],
                      optimizers=torch.optim.SGD(model.parameters(), lr=1e-3), device='cpu', progress_bar=False)
    trainer.fit()
    for domain in domains:
        series = in_memory.data[f'metrics/continuation/{domain}/accuracy']
        assert len(series) == 4  # two callbacks x batches 2 and 4
    assert model.model.training  # scoring restored training mode
    expected = score_items(model.model, tiny_tokenizer, every_batch.items, batch_size=32)
    assert after_eval.last_metrics['metrics/continuation/accuracy'] == pytest.approx(expected.accuracy())
    assert len(every_batch.items) == 6 * len(domains)


def test_callback_fails_early_on_bad_config(tmp_path):
    from drp_foundry.composer.continuation_eval_callback import ContinuationEval

    with pytest.raises(FileNotFoundError, match='drp_continuation_eval.items_path'):
        ContinuationEval(str(tmp_path / 'none.jsonl'))
    items_path = write_items([ContinuationItem('ctx', ' r', ' w', 'd')], tmp_path / 'i.jsonl')
    with pytest.raises(ValueError, match='drp_continuation_eval.normalization'):
        ContinuationEval(str(items_path), normalization='bytes')
    with pytest.raises(ValueError, match='drp_continuation_eval.interval'):
        ContinuationEval(str(items_path), interval='sometimes')
    with pytest.raises(ValueError, match='drp_continuation_eval.interval'):
        ContinuationEval(str(items_path), interval=0)


# ----------------------------------------------------------------------------- lm-eval harness


def test_packaged_task_yamls_are_the_generator_output(tmp_path):
    from drp_foundry.eval.lm_eval_tasks import DEFAULT_DOMAINS, TASKS_DIR, write_task_configs

    for path in write_task_configs(DEFAULT_DOMAINS, tmp_path):
        assert (TASKS_DIR / path.name).read_text() == path.read_text(), path.name
    with pytest.raises(ValueError, match='letters, digits'):
        write_task_configs(['bad domain'], tmp_path)


@pytest.mark.slow
def test_lm_eval_tasks_run_and_agree_with_the_scorer(trained_model, tiny_tokenizer, offline_items, domains,
                                                     tmp_path, monkeypatch):
    import lm_eval  # the `eval` extra; `make setup` installs it
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from drp_foundry.eval.lm_eval_tasks import GROUP, TASKS_DIR, task_name

    subset = [i for d in domains for i in [j for j in offline_items if j.domain == d][:8]]
    monkeypatch.setenv('DRP_CONTINUATION_ITEMS', str(write_items(subset, tmp_path / 'items.jsonl')))
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=trained_model, tokenizer=tiny_tokenizer, batch_size=16, max_length=256),
        tasks=[GROUP], task_manager=TaskManager(include_path=str(TASKS_DIR)), log_samples=False)['results']
    ours = score_items(trained_model, tiny_tokenizer, subset)
    for domain, acc in ours.per_domain_accuracy('sum').items():
        assert results[task_name(domain)]['acc,none'] == pytest.approx(acc), domain
    assert results[GROUP]['acc,none'] == pytest.approx(ours.macro_accuracy('sum'))
