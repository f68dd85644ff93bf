"""A tied model directory loads through LLM-Foundry without the "newly initialized ... lm_head.weight" warning."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config

from drp_foundry.hf_tied_weights import store_tied_output_embedding

REPO = Path(__file__).resolve().parents[1]
NEWLY_INITIALIZED = 'newly initialized'


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_through_foundry(model_dir: Path, tokenizer) -> tuple[torch.nn.Module, list[str]]:
    """``hf_causal_lm`` as a Foundry YAML builds it; returns the HF model and transformers' warnings."""
    from llmfoundry.utils.builders import build_composer_model

    handler = _Records()
    logger = logging.getLogger('transformers')
    logger.addHandler(handler)
    try:
        model = build_composer_model(name='hf_causal_lm', tokenizer=tokenizer,
                                     cfg={'pretrained_model_name_or_path': str(model_dir), 'pretrained': True,
                                          'attn_implementation': 'eager'})
    finally:
        logger.removeHandler(handler)
    return model.model, handler.messages


def _tied_model_dir(path: Path, **save_kwargs) -> tuple[Path, torch.nn.Module]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=512, tie_word_embeddings=True)).eval()
    model.save_pretrained(path, **save_kwargs)
    return path, model


def assert_same_weights(loaded, reference):
    got, want = loaded.state_dict(), reference.state_dict()
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_storing_the_tied_head_silences_foundry_and_changes_nothing_else(tmp_path, tiny_tokenizer):
    model_dir, reference = _tied_model_dir(tmp_path / 'tied')
    _, before = load_through_foundry(model_dir, tiny_tokenizer)
    assert any(NEWLY_INITIALIZED in m and 'lm_head.weight' in m for m in before), before  # the symptom, reproduced

    assert store_tied_output_embedding(model_dir) is True
    assert store_tied_output_embedding(model_dir) is False  # idempotent
    loaded, after = load_through_foundry(model_dir, tiny_tokenizer)
    assert not any(NEWLY_INITIALIZED in m for m in after), after
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in reference.parameters())
    assert_same_weights(loaded, reference)


def test_a_sharded_checkpoint_gets_the_head_in_the_embedding_shard(tmp_path, tiny_tokenizer):
    model_dir, reference = _tied_model_dir(tmp_path / 'sharded', max_shard_size='100KB')
    index = json.loads((model_dir / 'model.safetensors.index.json').read_text())
    assert 'lm_head.weight' not in index['weight_map']
    assert store_tied_output_embedding(model_dir) is True
    index = json.loads((model_dir / 'model.safetensors.index.json').read_text())
    assert index['weight_map']['lm_head.weight'] == index['weight_map']['model.embed_tokens.weight']
    loaded, messages = load_through_foundry(model_dir, tiny_tokenizer)
    assert not any(NEWLY_INITIALIZED in m for m in messages), messages
    assert_same_weights(loaded, reference)


def test_untied_models_are_left_alone(tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama_config(vocab_size=512)).save_pretrained(tmp_path)
    before = (tmp_path / 'model.safetensors').read_bytes()
    assert store_tied_output_embedding(tmp_path) is False
    assert (tmp_path / 'model.safetensors').read_bytes() == before


def test_an_earlier_smollm2_conversion_is_upgraded_in_place_without_the_gguf(tmp_path, tiny_tokenizer, monkeypatch):
    from drp_foundry.demo import smollm2

    model_dir, _ = _tied_model_dir(tmp_path / 'converted')
    (model_dir / smollm2.MARKER).write_text(json.dumps({'source': 'x', 'dtype': 'float32'}))  # layout 1
    assert not smollm2.is_converted(model_dir)
    monkeypatch.setattr(smollm2, 'locate_gguf', lambda: pytest.fail('the upgrade must not convert again'))
    smollm2.convert(model_dir)
    assert smollm2.is_converted(model_dir)
    assert json.loads((model_dir / smollm2.MARKER).read_text())['layout'] == smollm2.LAYOUT
    _, messages = load_through_foundry(model_dir, tiny_tokenizer)
    assert not any(NEWLY_INITIALIZED in m for m in messages), messages


@pytest.mark.slow
def test_a_fresh_smollm2_conversion_loads_through_foundry_without_the_warning(tmp_path):
    """Converts SmolLM2-135M from the GGUF into a temporary folder and loads it as a Foundry run would,
    in a fresh interpreter whose whole output is searched for the warning."""
    out = tmp_path / 'smollm2-135m'
    script = f'''
import torch
from transformers import AutoTokenizer
from llmfoundry.utils.builders import build_composer_model
from drp_foundry.demo.smollm2 import convert
convert({str(out)!r})
tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
model = build_composer_model(name='hf_causal_lm', tokenizer=tokenizer,
                             cfg={{'pretrained_model_name_or_path': {str(out)!r}, 'pretrained': True}}).model
print('TIED', model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
print('PARAMS', sum(p.numel() for p in model.parameters()))
ids = tokenizer('The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.',
                return_tensors='pt').input_ids
with torch.no_grad():
    print('LOSS', round(model(input_ids=ids, labels=ids).loss.item(), 4))
'''
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert NEWLY_INITIALIZED not in log and 'You should probably TRAIN' not in log, log[-4000:]
    assert 'TIED True' in log and 'PARAMS 134515008' in log
    loss = float(log.split('LOSS ')[1].split()[0])
    assert loss < 4.0  # pretrained weights on plain English (a fresh init scores about ln 49152 = 10.8)
