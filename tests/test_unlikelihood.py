"""Token-level unlikelihood: the term against a brute-force reference, its candidates, and the
drp_unlikelihood algorithm (alpha 0 = the plain run bitwise; alpha > 0 adds exactly alpha * UL)."""

from __future__ import annotations

import math

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.models import HuggingFaceModel
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM

from drp_foundry.composer.unlikelihood import Unlikelihood
from drp_foundry.losses.unlikelihood import token_unlikelihood


def brute_force(logits, ids, labels):
    probs = logits.softmax(-1)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if int(labels[b, t + 1]) == -100:
                continue
            candidates = set(ids[b, :t + 1].tolist()) - {int(labels[b, t + 1])}
            total += sum(-math.log(1 - float(probs[b, t, c])) for c in candidates)
            count += 1
    return total / count


def test_matches_the_definition_with_ignored_labels():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 9, 13), torch.randint(0, 13, (3, 9))
    labels = ids.clone()
    labels[0, 4] = labels[2, 8] = -100
    assert float(token_unlikelihood(logits, ids, labels)) == pytest.approx(brute_force(logits, ids, labels), rel=1e-5)


def test_candidates_are_distinct_earlier_tokens_other_than_the_target():
    ids = torch.tensor([[5, 7, 5, 5]])
    logits = torch.full((1, 4, 10), -30.0)
    logits[0, :, 7] = 0.0  # p(7) ~ 1 at every position, nothing else
    # position 0 predicts 7 (candidates {5}); 1 predicts 5 ({7}); 2 predicts 5 ({7}; 5 counted once and due)
    expected = (0.0 - 2 * math.log(1e-5)) / 3
    assert float(token_unlikelihood(logits, ids, min_gap=1e-5)) == pytest.approx(expected, rel=1e-4)
    logits[0, :, 7], logits[0, :, 3] = -30.0, 0.0  # all mass on a token never seen: no penalty
    assert float(token_unlikelihood(logits, ids)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_lowers_the_probability_of_a_repeated_token():
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = torch.zeros(1, 4, 6, requires_grad=True)
    token_unlikelihood(logits, ids).backward()
    assert logits.grad[0, 2, 1] > 0 and logits.grad[0, 2, 4] < 0  # seen token 1 pushed down, the target up


def _fit(alpha, steps=3):
    torch.manual_seed(0)
    config = tiny_llama_config()
    model = HuggingFaceModel(AutoModelForCausalLM.from_config(config), use_logits=True)
    data = torch.randint(0, config.vocab_size, (12, 17), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{'input_ids': row, 'labels': row} for row in data], batch_size=4)
    logger = InMemoryLogger()
    algorithms = [] if alpha is None else [Unlikelihood(alpha)]
    Trainer(model=model, optimizers=torch.optim.SGD(model.parameters(), lr=0.1), train_dataloader=loader,
            max_duration=f'{steps}ba', algorithms=algorithms, loggers=[logger], progress_bar=False,
            log_to_console=False, device='cpu', seed=0).fit()
    return model, logger


def test_alpha_zero_is_the_plain_run_bitwise_and_alpha_adds_its_term():
    plain, plain_log = _fit(None)
    zero, zero_log = _fit(0.0)
    for (key, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), key
    assert [v for _, v in zero_log.data['drp/unlikelihood']][0] > 0  # computed and logged
    _, one_log = _fit(1.0, steps=1)
    first_loss = float(one_log.data['loss/train/total'][0][1])
    assert first_loss == pytest.approx(float(plain_log.data['loss/train/total'][0][1])
                                       + one_log.data['drp/unlikelihood'][0][1], rel=1e-5)


@pytest.mark.parametrize('alpha', [-1.0, True, 'high'])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match='drp_unlikelihood.alpha must be a number >= 0'):
        Unlikelihood(alpha)


# --- sequence-level unlikelihood ---------------------------------------------------------------

def test_repeated_ngram_mask_marks_repeats_runs_and_respects_start():
    from drp_foundry.losses.unlikelihood import repeated_ngram_mask

    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 4], [5, 5, 5, 5, 6, 7, 8]])
    assert repeated_ngram_mask(ids, ngram=3).tolist() == [
        [False, False, False, True, True, True, False],  # (1, 2, 3) said again
        [False, True, True, True, False, False, False]]  # a run of 4: the second (5, 5, 5) repeats the first
    assert not repeated_ngram_mask(ids[:1], ngram=3, start=1).any()  # the first (1, 2, 3) is before start
    assert not repeated_ngram_mask(ids[:1], ngram=4).any()


def test_sequence_unlikelihood_matches_the_definition_and_lowers_repeated_tokens():
    from drp_foundry.losses.unlikelihood import repeated_ngram_mask, sequence_unlikelihood

    torch.manual_seed(0)
    ids = torch.tensor([[9, 8, 1, 2, 3, 1, 2, 3], [9, 7, 4, 4, 4, 4, 4, 5]])
    logits = torch.randn(2, 8, 12, requires_grad=True)
    start = 2
    probs = logits.softmax(-1)
    mask = repeated_ngram_mask(ids, 3, start)
    expected = sum(-math.log(1 - float(probs[b, t - 1, ids[b, t]])) for b in range(2) for t in range(start, 8)
                   if mask[b, t]) / (2 * (8 - start))
    term = sequence_unlikelihood(logits, ids, start, ngram=3)
    assert float(term) == pytest.approx(expected, rel=1e-5) and expected > 0
    term.backward()
    assert logits.grad[0, 4, 1] > 0  # position 4 produced the repeated 1: its logit is pushed down
    assert torch.all(logits.grad[0, :start - 1] == 0)  # the prefix is not penalised
    with pytest.raises(ValueError, match='start must be'):
        sequence_unlikelihood(logits, ids, 0)


def _constant_output_model():
    """A tiny Llama whose greedy decoding repeats token 0 forever: a zero final norm makes every logit 0, and
    the first of equal scores wins."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    with torch.no_grad():
        model.model.norm.weight.zero_()
    return model


def test_greedy_continuations_equal_transformers_generate():
    from drp_foundry.eval.loop_rate import greedy_continuations

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    prefixes = torch.randint(0, 512, (5, 6), generator=torch.Generator().manual_seed(3))
    ours = greedy_continuations(model, prefixes, new_tokens=9, batch_size=2)
    with torch.no_grad():
        theirs = model.generate(input_ids=prefixes, attention_mask=torch.ones_like(prefixes), max_new_tokens=9,
                                min_new_tokens=9, do_sample=False, pad_token_id=0)
    assert ours == theirs[:, 6:].tolist()
    model.train()
    greedy_continuations(model, prefixes, new_tokens=2)
    assert model.training  # the caller's mode is restored


def test_loop_rate_counts_flagged_continuations_per_domain(tmp_path):
    import numpy as np
    from streaming import MDSWriter

    from drp_foundry.eval.loop_rate import heldout_prefixes, loop_rate

    for domain in ('a', 'b'):
        with MDSWriter(out=str(tmp_path / domain / 'eval'), columns={'tokens': 'ndarray:int32'}) as writer:
            for i in range(3):
                writer.write({'tokens': np.arange(20, dtype=np.int32) + i})
    prefixes = heldout_prefixes(tmp_path, prefix_tokens=5, per_domain=2)
    assert {d: tuple(p.shape) for d, p in prefixes.items()} == {'a': (2, 5), 'b': (2, 5)}
    looping = loop_rate(_constant_output_model(), prefixes, new_tokens=8)
    assert looping.counts == {'a': (2, 2), 'b': (2, 2)} and looping.overall == 1.0
    cut = loop_rate(_constant_output_model(), prefixes, new_tokens=8, eos_token_id=0)  # stops at once: no loop
    assert cut.overall == 0.0 and cut.summary()['prefixes'] == 4


def _fit_sequence_ul(alpha, steps, every=1, lr=0.05, looping=False, start=0):
    from drp_foundry.composer.unlikelihood import SequenceUnlikelihood

    model = HuggingFaceModel(_constant_output_model() if looping else AutoModelForCausalLM.from_config(
        tiny_llama_config()), use_logits=True)
    data = torch.randint(0, 512, (4 * steps, 24), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{'input_ids': row, 'labels': row} for row in data], batch_size=4)
    logger = InMemoryLogger()
    algorithms = [] if alpha is None else [SequenceUnlikelihood(alpha, every=every, prefix_tokens=8,
                                                                continuation_tokens=12, start=start)]
    Trainer(model=model, optimizers=torch.optim.SGD(model.parameters(), lr=lr), train_dataloader=loader,
            max_duration=f'{steps}ba', algorithms=algorithms, loggers=[logger], progress_bar=False,
            log_to_console=False, device='cpu', seed=0).fit()
    return model, logger


def test_sequence_unlikelihood_algorithm_adds_its_term():
    torch.manual_seed(0)
    _, plain_log = _fit_sequence_ul(None, steps=1, looping=True)
    torch.manual_seed(0)
    _, one_log = _fit_sequence_ul(2.0, steps=1, looping=True)
    term = one_log.data['drp/sequence_unlikelihood/term'][0][1]
    assert term > 0 and one_log.data['drp/sequence_unlikelihood/loop_share'][0][1] == 1.0
    assert float(one_log.data['loss/train/total'][0][1]) == pytest.approx(
        float(plain_log.data['loss/train/total'][0][1]) + 2.0 * term, rel=1e-5)


def test_training_on_the_term_lowers_a_learned_loop_on_held_out_prefixes():
    """A tiny model first learns to copy its last token (rows of one token), so greedy decoding runs one token
    forever with high confidence; steps on the sequence-level term alone then lower the probability of the
    repeated tokens on prefixes it was not trained on."""
    from drp_foundry.composer.unlikelihood import apply_sequence_unlikelihood

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    rows = torch.Generator().manual_seed(0)

    def constant_rows(n):
        return torch.randint(0, 32, (n, 1), generator=rows).repeat(1, 24)

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        batch = constant_rows(16)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = constant_rows(16)

    def held_out_term():
        with torch.no_grad():
            return float(apply_sequence_unlikelihood(torch.zeros(()), model, held_out, 1.0, 8, 12)[1])

    before = held_out_term()
    for _ in range(20):
        loss, _, _ = apply_sequence_unlikelihood(torch.zeros(()), model, constant_rows(8), 1.0, 8, 12)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 0.5 and held_out_term() < before / 4, (before, held_out_term())


@pytest.mark.parametrize('every, start, applied', [(2, 0, [1, 3]), (1, '0.5dur', [3, 4]), (1, 3, [4]),
                                                    (2, '2ba', [3])])
def test_sequence_unlikelihood_every_and_start_pick_the_batches(every, start, applied):
    _, log = _fit_sequence_ul(1.0, steps=4, every=every, start=start)
    assert [int(step.batch) for step, _ in log.data['drp/sequence_unlikelihood/term']] == applied


@pytest.mark.parametrize('key, value', [('alpha', -1.0), ('every', 0), ('prefix_tokens', 0),
                                        ('continuation_tokens', 3), ('ngram', 1.5), ('start', '1dur'),
                                        ('start', '5ep'), ('start', 'soon')])
def test_sequence_unlikelihood_bad_keys_are_refused(key, value):
    from drp_foundry.composer.unlikelihood import SequenceUnlikelihood

    with pytest.raises(ValueError, match=f'drp_sequence_unlikelihood.{key} must be'):
        SequenceUnlikelihood(**{key: value})
