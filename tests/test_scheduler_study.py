"""bench/scheduler_study.py: its in-memory mixture stream (the scheduler contract) and the paired statistics."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from conftest import load_bench


def _study():
    return load_bench('scheduler_study')


def _train(sizes):
    return {name: torch.arange(n * 4).view(n, 4) + 1000 * i for i, (name, n) in enumerate(sizes.items())}


def test_mixture_stream_follows_set_proportions_counts_and_continues_across_stages():
    study = _study()
    data = study.MixtureData(_train({'a': 50, 'b': 30}), [0.5, 0.5], batch=10, seed=3)
    stream = iter(data)
    take = lambda n: [next(stream) for _ in range(n)]  # noqa: E731
    take(20)  # batches 0, 1
    data.set_proportions([1.0, 0.0], at_batch=2)
    batch2 = take(10)
    assert all(int(row['input_ids'][0]) < 1000 for row in batch2)  # only domain a from batch 2 on
    np.testing.assert_array_equal(data.samples_per_domain(3), np.sum(data.per_batch_counts[:3], axis=0))
    assert data.samples_per_domain(3)[0] >= 10 and data.samples_per_domain(0).sum() == 0
    seen_a = [int(row["input_ids"][0]) for row in batch2]
    assert len(set(seen_a)) == len(seen_a)  # no repeat inside a pass

    before = data.repeats().copy()
    data.new_stage([0.5, 0.5])  # next training run: batch clock back to 0, domains continue where they were
    assert data.samples_per_domain(0).sum() == 0 and data.proportions.tolist() == [0.5, 0.5]
    np.testing.assert_allclose(data.repeats(), before)
    rows = take(50)
    np.testing.assert_allclose(data.repeats() * [50, 30], before * [50, 30] + data.samples_per_domain(5))
    first_a = [int(r['input_ids'][0]) for r in rows if int(r['input_ids'][0]) < 1000]
    drawn_before = int(round(before[0] * 50))
    if drawn_before + len(first_a) <= 50:  # still in the first pass over domain a: nothing seen twice
        assert not set(first_a) & {int(data.train[0][i][0]) for i in data.orders[0][:drawn_before]}


def test_paired_differences_and_their_standard_error():
    study = _study()
    domains = study.DOMAINS

    def result(policy, seed, worst, rest=1.0):
        score = {d: rest for d in domains}
        score[domains[seed % len(domains)]] = worst
        return {'policy': policy, 'seed': seed, 'score': score, 'repeats_total': [0.1] * len(domains),
                'q_continue_end': [1 / len(domains)] * len(domains), 'q_prune_end': [1 / len(domains)] * len(domains),
                'reference_losses_end': None, 'expected_params_end_of_pruning': 1.0, 'target_params': 1.0}

    constant_worst = [3.0, 3.2, 2.9]
    dro_worst = [2.8, 3.1, 2.9]
    results = [result('constant', s, w) for s, w in enumerate(constant_worst)]
    results += [result('dro', s, w) for s, w in enumerate(dro_worst)]
    table = study.summarize(results, [0, 1, 2])
    diff = np.array(dro_worst) - np.array(constant_worst)  # -0.2, -0.1, 0
    mean, se = table['dro']['d_worst_vs_constant']
    assert mean == pytest.approx(diff.mean())
    assert se == pytest.approx(diff.std(ddof=1) / math.sqrt(3))
    assert table['dro']['worst'] == pytest.approx(np.mean(dro_worst))
    assert 'd_worst_vs_dro' not in table['dro'] and table['constant']['n'] == 3


# --- the multilingual preset ---------------------------------------------------------------------

CORPUS_CHARS = {'EN': 4_115_990, 'QA': 3_510_998, 'CODE': 1_417_953, 'TEX': 802_286, 'BG': 249_576, 'XG': 200_000}


def test_languages_are_the_six_stated_domains_in_their_proportions():
    study = _study()
    langs = study.build_languages()  # the embedded corpus, never ../shared
    assert list(langs) == ['EN', 'QA', 'CODE', 'TEX', 'BG', 'XG']
    chars = {lang: sum(len(d) for d in docs) for lang, docs in langs.items()}
    assert chars == CORPUS_CHARS
    total = sum(CORPUS_CHARS.values())
    shares = {lang: c / total for lang, c in chars.items()}
    assert shares['EN'] == pytest.approx(0.3998, abs=1e-4) and shares['XG'] == pytest.approx(0.0194, abs=1e-4)
    # EN is c4-rp + cc (every document, uncapped); XG is book's first 200k characters through the cipher
    sources = {s: [r['text'] for r in study.corpus_records(study.DEMO_CORPUS, s) if r.get('text')]
               for s in ('c4-rp', 'cc', 'book', 'wiki')}
    assert langs['EN'] == sources['c4-rp'] + sources['cc'] and langs['BG'] == sources['wiki']
    assert langs['XG'] == [study.greek_cipher('\n'.join(sources['book'])[:200_000])]
    assert not any('a' <= ch <= 'z' or 'A' <= ch <= 'Z' for ch in langs['XG'][0])
    assert sum('\u0400' <= ch <= '\u04ff' for ch in langs['BG'][0]) > 0.5 * sum(ch.isalpha() for ch in langs['BG'][0])


def test_cipher_is_a_bijection_on_letters_and_leaves_everything_else_alone():
    study = _study()
    latin = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
    greek = study.greek_cipher(latin)
    assert len(greek) == 52 and len(set(greek)) == 52
    assert all('\u0370' <= ch <= '\u03ff' for ch in greek) and not set(greek) & set(latin)
    inverse = str.maketrans(greek, latin)
    text = 'The Quick brown fox, 42 jumps! é ü Ж  \n\t{code} [1]'
    assert study.greek_cipher(text).translate(inverse) == text
    others = ''.join(chr(c) for c in range(0x20, 0x3000) if chr(c) not in latin)
    assert study.greek_cipher(others) == others


def _tiny_tokenizer(tmp_path, texts):
    from transformers import AutoTokenizer

    from data_prep.tokenizer import train_bpe_tokenizer
    return AutoTokenizer.from_pretrained(train_bpe_tokenizer(iter(texts), 300, tmp_path / 'tok'))


def _fixture_langs():
    rng = np.random.default_rng(0)
    words = ['alpha', 'beta', 'gamma', 'delta', 'omega', 'zeta', 'theta', 'kappa', 'lambda', 'sigma']
    return {name: [' '.join(rng.choice(words, size=int(rng.integers(40, 120)))) + f' {name}{i}'
                   for i in range(n)] for name, n in (('EN', 40), ('XG', 30))}


def test_steer_and_score_splits_share_no_token_window(tmp_path):
    study = _study()
    langs = _fixture_langs()
    langs['XG'] = [study.greek_cipher(d) for d in langs['XG']]
    tokenizer = _tiny_tokenizer(tmp_path, [d for docs in langs.values() for d in docs])
    data = study.tokenize_and_split(langs, tokenizer, seq=16, steer_tokens=64, score_tokens=128)
    for lang, split in data['splits'].items():
        assert len(split['steer']) == 4 and len(split['score']) == 8
        # three contiguous, disjoint blocks of one stream, in the order train, steer, score
        stream = torch.cat([split['train'], split['steer'], split['score']]).reshape(-1)
        order = list(range(len(langs[lang])))
        import random
        random.Random(f'order-{lang}').shuffle(order)
        ids = [t for i in order for t in tokenizer(langs[lang][i])['input_ids'] + [tokenizer.eos_token_id]]
        assert stream.tolist() == ids[:len(stream)]
        steer = {tuple(w.tolist()) for w in split['steer']}
        assert not steer & {tuple(w.tolist()) for w in split['score']}
        assert not steer & {tuple(w.tolist()) for w in split['train']}
        chars = [len(tokenizer.decode(w[1:].tolist(), skip_special_tokens=True)) for w in split['score']]
        assert split['score_chars'].tolist() == chars
    assert data['chars_per_token']['XG'] < data['chars_per_token']['EN']  # the cipher script costs tokens


def test_gates_compute_on_a_tiny_fixture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    study = _study()
    # unigram cross-entropy, by hand: train counts {0: 3, 1: 1} + 0.5 over a vocabulary of 3
    train = torch.tensor([[0, 0, 0, 1]])
    score = torch.tensor([[2, 0, 1]])  # predicted tokens 0 and 1
    p = np.array([3.5, 1.5, 0.5]) / 5.5
    assert study.unigram_cross_entropy(train, score, vocab=3) == pytest.approx(-(np.log(p[0]) + np.log(p[1])) / 2)

    g1 = study.gate_g1({'EN': 3.0, 'XG': 2.5}, {'EN': 4.2, 'XG': 3.4})
    assert g1['gaps'] == pytest.approx({'EN': 1.2, 'XG': 0.9}) and not g1['passed']
    assert study.gate_g1({'EN': 3.0, 'XG': 2.3}, {'EN': 4.2, 'XG': 3.4})['passed']
    even = study.gate_g2({'EN': 1.0, 'XG': 1.5}, {'EN': 1.30, 'XG': 1.85})  # +0.30, +0.35: ratio 1.17
    assert even['spread'] == pytest.approx(0.05) and not even['passed']
    uneven = study.gate_g2({'EN': 1.0, 'XG': 1.5}, {'EN': 1.10, 'XG': 1.80})  # +0.10, +0.30
    assert uneven['ratio'] == pytest.approx(3.0) and uneven['passed']
    assert study.gate_g2({'EN': 1.0, 'XG': 1.5}, {'EN': 0.99, 'XG': 1.7})['ratio'] == math.inf

    # scoring on a tiny random model: nats/char = summed token NLL / decoded characters
    langs = _fixture_langs()
    tokenizer = _tiny_tokenizer(tmp_path, [d for docs in langs.values() for d in docs])
    data = study.tokenize_and_split(langs, tokenizer, seq=16, steer_tokens=64, score_tokens=128)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16))
    old = study.LANGS
    study.LANGS = ['EN', 'XG']
    try:
        scores = study.score_split(hf, data)
    finally:
        study.LANGS = old
    for lang in ('EN', 'XG'):
        seqs = data['splits'][lang]['score']
        with torch.no_grad():
            logits = hf(input_ids=seqs).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction='sum')
        assert scores['tok'][lang] == pytest.approx(float(nll) / (seqs.shape[0] * 15), rel=1e-5)
        assert scores['char'][lang] == pytest.approx(float(nll) / float(data['splits'][lang]['score_chars'].sum()),
                                                     rel=1e-5)


def test_paired_t_interval_and_the_fixed_reading():
    from scipy import stats
    study = _study()
    pair = study.paired([1.0, 2.0, 3.0, 4.5], [1.5, 2.2, 3.1, 4.4])
    diff = np.array([-0.5, -0.2, -0.1, 0.1])
    se = diff.std(ddof=1) / 2
    assert pair['mean'] == pytest.approx(diff.mean()) and pair['se'] == pytest.approx(se)
    assert pair['hi'] == pytest.approx(diff.mean() + stats.t.ppf(0.975, 3) * se)

    def table(c_m1_hi, c_m2_hi, sh_m1, sh_m2, dro_m1):
        def entry(m1_hi, m2_hi, m1_mean=-0.1, m2_mean=0.0):
            return {'M1_char': {'mean': m1_mean, 'hi': m1_hi}, 'M2_char': {'mean': m2_mean, 'hi': m2_hi}}
        return {'pairs': {'drpruning-constant': entry(c_m1_hi, c_m2_hi),
                          'drpruning-sheared': entry(0, 0, sh_m1, sh_m2),
                          'drpruning-dro': entry(0, 0, dro_m1)}}
    gates = {'G1': {'passed': True}, 'G2': {'passed': True}}
    assert study.reading(table(-0.01, 0.004, -0.1, -0.1, -0.01), gates)['dynamic_earns'] is True
    keeps = study.reading(table(-0.01, 0.004, -0.1, -0.1, 0.01), gates)
    assert keeps['earns_keep'] and not keeps['dynamic_earns']
    assert not study.reading(table(0.001, 0.004, -0.1, -0.1, -0.01), gates)['earns_keep']  # M1 interval reaches 0
    assert not study.reading(table(-0.01, 0.006, -0.1, -0.1, -0.01), gates)['earns_keep']  # M2 costs too much
    assert not study.reading(table(-0.01, 0.004, 0.1, -0.1, -0.01), gates)['earns_keep']  # loses to sheared on M1
    failed = study.reading(table(-0.01, 0.004, -0.1, -0.1, -0.01), {'G1': {'passed': False}, 'G2': {'passed': True}})
    assert failed['verdict'] == 'premise not met' and failed['earns_keep'] is None


def test_sheared_continues_from_its_end_of_pruning_mixture():
    study = _study()
    p0, q_end = [0.5, 0.3, 0.2], [0.7, 0.2, 0.1]
    assert study.continue_start('sheared', q_end, p0).tolist() == q_end
    for policy in ('constant', 'dro', 'drpruning'):
        assert study.continue_start(policy, q_end, p0).tolist() == p0
    assert study.ml_policy_config('sheared', {'EN': 1.0})['clip_excess_at_zero'] is False
    assert study.ml_policy_config('constant', {'EN': 1.0}) == {'name': 'constant'}
    assert study.ml_arms([0, 1], study.POLICIES)[0] == ('constant', 0)  # G2 reads it first


def test_an_unknown_source_config_key_is_refused_naming_the_valid_ones(tmp_path):
    study = _study()
    level = logging.getLogger('drp_foundry').level
    with pytest.raises(SystemExit) as err:
        study.main_multilingual(['--work', str(tmp_path / 'w'), '--source-config', '{"hidden": 256}'])
    message = str(err.value)
    assert "['hidden'] are not source settings" in message
    for key in study.ML_SETTINGS['model']:
        assert key in message
    assert not (tmp_path / 'w').exists()  # refused before anything was written
    assert logging.getLogger('drp_foundry').level == level  # nor the log level changed
