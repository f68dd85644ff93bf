"""Shared fixtures: the seven-domain sample (from the embedded corpus), an offline tokenizer, tiny model configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The seven-domain RedPajama sample ships in the package, zstd-compressed (its README gives provenance and digests).
EMBEDDED_CORPUS = REPO_ROOT / 'drp_foundry' / 'demo' / 'corpus'

# One thread per process: `make test` runs a pytest worker per core, and every process a test starts (train.py,
# its ranks, the demo's stages) inherits this; with torch's default (a thread per core) each would compete with
# the other worker for the same cores, and OpenMP threads that wait for a busy core spin and burn CPU.
torch.set_num_threads(1)
os.environ['OMP_NUM_THREADS'] = '1'
os.environ['MKL_NUM_THREADS'] = '1'


# The files whose end-to-end runs take longest (make test's --durations on 2 cores), longest first. An
# ordering hint only: a file not named here still runs, after these; a stale list costs time, not coverage.
LONGEST_FILES = ('test_first_hour.py', 'test_kill_resume.py', 'test_sharded_training.py', 'test_run_lock.py',
                 'test_tied_weights.py', 'test_continuation_eval.py', 'test_projection_sharded.py',
                 'test_domain_eval_loaders.py', 'test_bad_inputs.py', 'test_multinode_streaming.py')


def pytest_collection_modifyitems(config, items):
    """The longest files first (``LONGEST_FILES``), then the other files with end-to-end runs (``slow``),
    then the rest; each file's tests in their order.

    Under pytest-xdist workers (``make test``: a file per worker, ``--no-loadscope-reorder`` so xdist keeps this
    order), the longest files start first and the short ones fill in behind them, instead of one long file
    running alone at the end.
    """
    slow_files = {item.path for item in items if item.get_closest_marker('slow')}

    def rank(item):
        name = item.path.name
        return (LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES),
                item.path not in slow_files)

    items.sort(key=rank)


def release_dead_streaming_shm() -> int:
    """Close the shared memory of StreamingDatasets that no longer exist; returns how many.

    mosaicml-streaming registers every shared-memory handle with ``atexit``, so its file
    descriptors stay open until the process ends, and each new StreamingDataset opens one more
    handle per earlier one while it looks for a free name. A training process makes a handful of
    datasets; this test session makes hundreds and would exhaust the descriptor limit. A handle
    whose only remaining referrer is its own ``atexit`` cleanup belongs to a dead dataset.
    """
    import atexit
    import gc
    import sys

    from streaming.base.shared.memory import SharedMemory

    gc.collect()
    handles = [o for o in gc.get_objects() if isinstance(o, SharedMemory)]
    released = 0
    for i in range(len(handles)):
        handle = handles[i]
        # referrers: `handles`, `handle`, getrefcount's argument, and the atexit bound method
        if sys.getrefcount(handle) <= 4:
            handle.cleanup()
            atexit.unregister(handle.cleanup)
            released += 1
        del handle
    return released


# Release after any test that leaves more descriptors open than this. Per module was not enough:
# the handles a module's datasets leave grow quadratically (each new dataset probes every earlier
# name), and one module reached 16,500 of the 20,000 allowed before its last test failed with
# "Too many open files". Counting /proc/self/fd is cheap; the gc scan runs only past the mark.
OPEN_FD_RELEASE_MARK = 1000


def open_fd_count() -> int:
    try:
        return len(os.listdir('/proc/self/fd'))
    except OSError:  # no procfs (macOS): release after every test
        return OPEN_FD_RELEASE_MARK + 1


@pytest.fixture(autouse=True)
def _release_streaming_shm_when_descriptors_pile_up():
    yield
    if open_fd_count() > OPEN_FD_RELEASE_MARK:
        release_dead_streaming_shm()


@pytest.fixture(autouse=True, scope='module')
def _release_streaming_shm_after_each_module():
    yield
    release_dead_streaming_shm()


def decompress_embedded_corpus(out: Path) -> Path:
    """``out/<domain>.jsonl``: the embedded corpus decompressed, byte for byte (idempotent)."""
    import zstandard

    out.mkdir(parents=True, exist_ok=True)
    for packed in sorted(EMBEDDED_CORPUS.glob('*.jsonl.zst')):
        target = out / packed.name[:-len('.zst')]
        if not target.exists():
            with open(packed, 'rb') as f:
                data = zstandard.ZstdDecompressor().stream_reader(f).read()
            partial = target.with_suffix('.partial')
            partial.write_bytes(data)
            partial.replace(target)
    return out


@pytest.fixture(scope='session')
def sample_dir(tmp_path_factory) -> Path:
    """The seven-domain sample as ``<domain>.jsonl`` files, decompressed from the embedded corpus."""
    return decompress_embedded_corpus(tmp_path_factory.mktemp('sample'))


def read_texts(jsonl: Path, limit: int | None = None) -> list[str]:
    texts = []
    with open(jsonl) as f:
        for line in f:
            texts.append(json.loads(line)['text'])
            if limit is not None and len(texts) >= limit:
                break
    return texts


def write_trimmed_corpus(source: Path, out: Path, domains: list[str], documents: int, characters: int) -> Path:
    """``out/<domain>.jsonl`` with the first ``documents`` documents of each domain, cut to ``characters``."""
    out.mkdir(parents=True, exist_ok=True)
    for domain in domains:
        texts = read_texts(source / f'{domain}.jsonl', limit=documents)
        (out / f'{domain}.jsonl').write_text(''.join(json.dumps({'text': t[:characters]}) + '\n' for t in texts))
    return out


@pytest.fixture(scope='session')
def tiny_tokenizer_dir(tmp_path_factory, sample_dir) -> Path:
    """A 512-token byte-level BPE tokenizer trained offline on a slice of the sample (HF format)."""
    from data_prep.tokenizer import train_bpe_tokenizer

    texts = []
    for jsonl in sorted(sample_dir.glob('*.jsonl')):
        texts.extend(t[:4000] for t in read_texts(jsonl, limit=40))
    out = tmp_path_factory.mktemp('tokenizer')
    train_bpe_tokenizer(texts, vocab_size=512, out_dir=out)
    return out


@pytest.fixture(scope='session')
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def tiny_llama_config(**overrides):
    """A 4-layer Llama (multi-head attention: as many KV heads as query heads)."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  tie_word_embeddings=False, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_gqa_config(**overrides):
    """A 4-layer Qwen2-style GQA decoder: 6 query heads over 2 KV heads, q/k/v biases, tied embeddings."""
    from transformers import Qwen2Config

    kwargs = dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


@pytest.fixture
def llama_config():
    return tiny_llama_config()


@pytest.fixture
def gqa_config():
    return tiny_gqa_config()


def load_bench(name: str, module_name: str | None = None):
    """``bench/<name>.py`` as a module (the bench scripts are not a package). It is entered in ``sys.modules``
    first: dataclasses look their module up there."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(module_name or name, REPO_ROOT / 'bench' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def copy_tracked_files(dest: Path) -> Path:
    """A copy of the repository's git-tracked files (as a fresh clone has them) at ``dest``; untracked and
    ignored files (models/, runs/, data/, caches) stay behind. Working-tree contents, so uncommitted edits
    of tracked files are included."""
    import shutil
    import subprocess

    listed = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO_ROOT, check=True, capture_output=True).stdout
    for name in filter(None, listed.decode().split('\0')):
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def perturbed_tiny_gqa_model(seed: int = 0):
    """A random tiny Qwen2 GQA model whose weights are far from their init (norm weights near 1 with noise,
    the rest N(0, 0.15^2)), so a scale error shows in the logits; eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_gqa_config(), attn_implementation='eager')
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.3 * noise if 'norm' in name else 0.15 * noise)
    return model.eval()


def run_forked(target, args_per_process: list[tuple], timeout: float) -> list[int | None]:
    """Run ``target(*args)`` in one forked process per ``args`` (the children inherit this process's imports),
    wait at most ``timeout`` seconds in all, kill any still running (its exit code is then -SIGKILL), and return
    the exit codes in order. The callers' ranks report errors through files of their own."""
    import multiprocessing
    import time

    context = multiprocessing.get_context('fork')
    processes = [context.Process(target=target, args=args) for args in args_per_process]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]
