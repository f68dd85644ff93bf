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
from drp_foundry.pruning.unlikelihood import token_unlikelihood


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
