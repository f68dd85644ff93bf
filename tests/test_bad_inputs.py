"""Table of bad inputs across the pipeline (issue 15): each stops with a message naming the file, key or
domain, before any model is built, and without touching what was already written.

Areas: data_prep, train.py configs (the pre-flight check that train.py runs first), export, and the
eval tools. One row = one mistake a user makes; ``run`` makes it and returns the error message.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from omegaconf import OmegaConf as om
from resume_harness import REPO, build_data, write_config

from data_prep.build_domain_mds import DataPrepError, PrepSettings, build_domain_mds
from drp_foundry.composer.config_checks import ConfigError, check_train_config

SETTINGS = PrepSettings(max_seq_len=32, max_train_samples=80, max_eval_samples=4)


@dataclass
class Ctx:
    """A good setup every row starts from (copied where the row changes it)."""
    work: Path
    corpus: Path
    data: Path
    config: dict

    def case_dir(self, name: str) -> Path:
        folder = self.work / 'cases' / name
        folder.mkdir(parents=True)
        return folder

    def corpus_copy(self, name: str) -> Path:
        folder = self.case_dir(name) / 'corpus'
        shutil.copytree(self.corpus, folder)
        return folder

    def data_copy(self, name: str) -> Path:
        folder = self.case_dir(name) / 'data'
        shutil.copytree(self.data, folder)
        return folder


@pytest.fixture(scope='module')
def ctx(tmp_path_factory, sample_dir) -> Ctx:
    work = tmp_path_factory.mktemp('bad_inputs')
    data = build_data(sample_dir, work)  # work/corpus -> work/data (3 domains, trained tokenizer)
    config = json.loads(write_config(work / 'good.yaml', data, work / 'run').read_text())
    check_train_config(om.create(config))  # the starting point is good
    return Ctx(work, work / 'corpus', data, config)


# --- data_prep -----------------------------------------------------------------------------------

def _prep(corpus: Path, out: Path, **kwargs) -> str:
    kwargs.setdefault('train_tokenizer_vocab', None if kwargs.get('tokenizer') else 400)
    kwargs.setdefault('settings', SETTINGS)
    with pytest.raises(DataPrepError) as err:
        build_domain_mds(corpus, out, **kwargs)
    assert not (out / 'manifest.json').exists(), 'a manifest appeared'
    return str(err.value)


def prep_case(mutate: Callable[[Path], None], **kwargs) -> Callable[[Ctx, str], str]:
    def run(c: Ctx, name: str) -> str:
        corpus = c.corpus_copy(name)
        mutate(corpus)
        return _prep(corpus, corpus.parent / 'out', **kwargs)
    return run


def _write(rel: str, data: bytes) -> Callable[[Path], None]:
    def mutate(corpus: Path) -> None:
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_bytes(data)
    return mutate


def _rename(src: str, dst: str) -> Callable[[Path], None]:
    def mutate(corpus: Path) -> None:
        (corpus / dst).parent.mkdir(parents=True, exist_ok=True)
        (corpus / src).rename(corpus / dst)
    return mutate


def _both(*mutations) -> Callable[[Path], None]:
    def mutate(corpus: Path) -> None:
        for m in mutations:
            m(corpus)
    return mutate


def _gzip_of(src: str, dst: str, cut: int | None = None) -> Callable[[Path], None]:
    def mutate(corpus: Path) -> None:
        data = gzip.compress((corpus / src).read_bytes())
        (corpus / dst).write_bytes(data[:cut] if cut else data)
    return mutate


def _zstd_truncated(src: str) -> Callable[[Path], None]:
    def mutate(corpus: Path) -> None:
        import zstandard

        data = zstandard.ZstdCompressor().compress((corpus / src).read_bytes())
        (corpus / src).unlink()
        (corpus / f'{src}.zst').write_bytes(data[:50])
    return mutate


def prep_rebuild_case(change: Callable[[Path], None], first: dict | None = None, **kwargs):
    """Build once, change something, build again: refused and the first build is untouched."""
    def run(c: Ctx, name: str) -> str:
        corpus = c.corpus_copy(name)
        out = corpus.parent / 'out'
        build_domain_mds(corpus, out, train_tokenizer_vocab=400, settings=SETTINGS, **(first or {}))
        before = (out / 'manifest.json').read_text()
        change(corpus)
        kwargs.setdefault('train_tokenizer_vocab', 400)
        kwargs.setdefault('settings', SETTINGS)
        with pytest.raises(DataPrepError) as err:
            build_domain_mds(corpus, out, **kwargs)
        assert (out / 'manifest.json').read_text() == before
        return str(err.value)
    return run


def _append_doc(corpus: Path) -> None:
    with open(corpus / 'wiki.jsonl', 'a') as f:
        f.write(json.dumps({'text': 'one more document ' * 30}) + '\n')


def _not_ours(c: Ctx, name: str) -> str:
    out = c.case_dir(name) / 'mine'
    out.mkdir()
    (out / 'thesis.tex').write_text('keep me')
    message = _prep(c.corpus, out, overwrite=True)
    assert (out / 'thesis.tex').read_text() == 'keep me'
    return message


def _foreign_in_data_root(c: Ctx, name: str) -> str:
    corpus = c.corpus_copy(name)
    out = corpus.parent / 'out'
    build_domain_mds(corpus, out, train_tokenizer_vocab=400, settings=SETTINGS)
    (out / 'runs').mkdir()
    with pytest.raises(DataPrepError) as err:
        build_domain_mds(corpus, out, train_tokenizer_vocab=400, overwrite=True,
                         settings=PrepSettings(**{**SETTINGS.__dict__, 'seed': 99}))
    assert (out / 'runs').is_dir()
    return str(err.value)


def _prep_cli(args: list[str]) -> Callable[[Ctx, str], str]:
    """``drp-prepare-data`` (its ``main``): exit status 2 and the message, no traceback."""
    def run(c: Ctx, name: str) -> str:
        import contextlib
        import io

        from drp_foundry.commands.data_prep import prepare_data_main as main

        out, err = c.case_dir(name) / 'out', io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = main(['--corpus', str(c.corpus), '--out', str(out), *args])
            except SystemExit as exit_:  # argparse
                code = exit_.code
        assert code == 2 and not out.exists()
        return err.getvalue()
    return run


# --- train.py configs (the pre-flight check) ------------------------------------------------------

def config_case(edit: Callable[[dict, Ctx, Path], None]) -> Callable[[Ctx, str], str]:
    def run(c: Ctx, name: str) -> str:
        cfg = copy.deepcopy(c.config)
        edit(cfg, c, c.case_dir(name))
        with pytest.raises(ConfigError) as err:
            check_train_config(om.create(cfg))
        return str(err.value)
    return run


def _set(path: str, value) -> Callable[[dict, Ctx, Path], None]:
    def edit(cfg: dict, c: Ctx, folder: Path) -> None:
        *parents, last = path.split('.')
        node = cfg
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


_DELETE = object()


def _with_data(change: Callable[[Path], None]) -> Callable[[dict, Ctx, Path], None]:
    """Point the config at a copy of the data root changed by ``change``."""
    def edit(cfg: dict, c: Ctx, folder: Path) -> None:
        data = folder / 'data'
        shutil.copytree(c.data, data)
        change(data)
        cfg['train_loader']['dataset']['data_root'] = str(data)
        for loader in cfg['eval_loaders']:
            loader['dataset']['local'] = str(data / Path(loader['dataset']['local']).name)
        cfg['tokenizer']['name'] = str(data / 'tokenizer')
    return edit


def _edit_manifest(**fields) -> Callable[[Path], None]:
    def change(data: Path) -> None:
        manifest = json.loads((data / 'manifest.json').read_text())
        for key, value in fields.items():
            manifest[key] = value(manifest) if callable(value) else value
        (data / 'manifest.json').write_text(json.dumps(manifest))
    return change


def _other_tokenizer(cfg: dict, c: Ctx, folder: Path) -> None:
    from data_prep.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(['some other text for another tokenizer'] * 50, vocab_size=300, out_dir=folder / 'tok')
    cfg['tokenizer']['name'] = str(folder / 'tok')


def _small_vocab_model(cfg: dict, c: Ctx, folder: Path) -> None:
    model = json.loads((REPO / 'yamls/demo/models/tiny-gqa/config.json').read_text())
    model['vocab_size'] = 1024
    (folder / 'model').mkdir()
    (folder / 'model' / 'config.json').write_text(json.dumps(model))
    cfg['model']['pretrained_model_name_or_path'] = str(folder / 'model')


def _stale_source(cfg: dict, c: Ctx, folder: Path) -> None:
    data = folder / 'data'
    shutil.copytree(c.data, data)
    corpus = folder / 'corpus'
    shutil.copytree(c.corpus, corpus)
    manifest = json.loads((data / 'manifest.json').read_text())
    manifest['corpus'] = str(corpus)
    (data / 'manifest.json').write_text(json.dumps(manifest))
    _append_doc(corpus)
    cfg['train_loader']['dataset']['data_root'] = str(data)


def refused_train_run(folder: Path) -> str:
    """``train.py folder/cfg.yaml`` in ``folder``: it must stop before LLM-Foundry's train entry, without a
    traceback; returns the message.

    Run in this process: ``drp_foundry.commands.train.main`` (what train.py runs) with LLM-Foundry's
    ``train_from_yaml`` replaced by a failure, so it must end in ``SystemExit`` with a message (what the
    script prints, exit 1, no traceback). tests/test_config_checks.py runs the real script in a fresh
    interpreter once (each such run costs an LLM-Foundry import, about 16 s of CPU)."""
    from unittest import mock

    from drp_foundry.commands import train

    here = os.getcwd()
    os.chdir(folder)
    try:
        with mock.patch('llmfoundry.command_utils.train_from_yaml',
                        side_effect=AssertionError("LLM-Foundry's train entry was reached")):
            with pytest.raises(SystemExit) as err:
                train.main([str(folder / 'cfg.yaml')])
    finally:
        os.chdir(here)
    message = err.value.code
    assert isinstance(message, str), f'exit without a message: {message!r}'
    return message


def _train_entry(edit: Callable[[dict, Ctx, Path], None]) -> Callable[[Ctx, str], str]:
    """train.py's entry: exits with the message and never reaches LLM-Foundry's trainer."""
    def run(c: Ctx, name: str) -> str:
        folder = c.case_dir(name)
        cfg = copy.deepcopy(c.config)
        edit(cfg, c, folder)
        (folder / 'cfg.yaml').write_text(json.dumps(cfg))
        return refused_train_run(folder)
    return run


# --- export ---------------------------------------------------------------------------------------

def _fake_checkpoint(path: Path, masks: bool = False) -> Path:
    model = {'model.lm_head.weight': torch.zeros(2, 2)}
    if masks:
        model['model.drp_masks._extra_state'] = {'format': 'nope'}
    torch.save({'state': {'model': model, 'integrations': {'huggingface': {'model': {'config': {}}}}}}, path)
    return path


def export_case(setup: Callable[[Path], tuple[list[str], Path]]) -> Callable[[Ctx, str], str]:
    """``setup(folder)`` -> (CLI args, a path that must be unchanged afterwards)."""
    def run(c: Ctx, name: str) -> str:
        from drp_foundry.commands.export import main

        folder = c.case_dir(name)
        args, keep = setup(folder)
        before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*'))
        result = subprocess.run([sys.executable, '-m', 'drp_foundry.commands.export', *args], capture_output=True, text=True,
                                cwd=REPO, timeout=120) if name.endswith('cli') else None
        if result is None:
            import contextlib
            import io

            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(args)
            assert code == 2
            message = err.getvalue()
        else:
            assert result.returncode == 2 and 'Traceback' not in result.stderr
            message = result.stderr
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*')) == before, 'export changed files'
        assert keep is None or keep.exists()
        return message
    return run


def _run_folder(folder: Path) -> Path:
    run = folder / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    _fake_checkpoint(run / 'checkpoints' / 'ep0-ba4-rank0.pt', masks=True)
    (run / 'metrics.jsonl').write_text('{"step": 1}\n')
    (run / 'plots').mkdir()
    return run


# --- eval tools -----------------------------------------------------------------------------------

def domain_loss_case(args: Callable[[Ctx, Path], list[str]]) -> Callable[[Ctx, str], str]:
    def run(c: Ctx, name: str) -> str:
        import contextlib
        import io

        from drp_foundry.commands.domain_loss import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(args(c, c.case_dir(name))) == 2
        return err.getvalue()
    return run


def eval_cli_case(args: Callable[[Ctx, Path], list[str]]) -> Callable[[Ctx, str], str]:
    def run(c: Ctx, name: str) -> str:
        from drp_foundry.commands.eval import main

        with pytest.raises(SystemExit) as exc:
            main(args(c, c.case_dir(name)))
        return str(exc.value.code)
    return run


TINY_MODEL = str(REPO / 'yamls/demo/models/tiny-gqa')


# --- the table --------------------------------------------------------------------------------------
# (area, id, run, substrings the message must contain; '{corpus}' / '{data}' are filled in)
CASES = [
    # data_prep: corpus layout and file contents (issue items 3 and 6)
    ('data_prep', 'missing-corpus', lambda c, n: _prep(c.work / 'no-such-corpus', c.case_dir(n) / 'o'),
     ['no-such-corpus', 'does not exist']),
    ('data_prep', 'missing-domain', lambda c, n: _prep(c.corpus, c.case_dir(n) / 'o', domains=['wiki', 'math']),
     ["['math'] not found", 'domains present']),
    ('data_prep', 'file-and-folder', prep_case(_write('wiki/more.jsonl', b'{"text": "x"}\n')),
     ["domain 'wiki' is given twice", 'wiki.jsonl', 'wiki/']),
    ('data_prep', 'two-files', prep_case(_gzip_of('wiki.jsonl', 'wiki.jsonl.gz')),
     ["domain 'wiki' is given twice", 'wiki.jsonl.gz']),
    ('data_prep', 'bz2-file', prep_case(_rename('wiki.jsonl', 'wiki.jsonl.bz2')),
     ['wiki.jsonl.bz2: cannot read this file type', '.jsonl.zst']),
    ('data_prep', 'parquet-file', prep_case(_write('arxiv2.parquet', b'PAR1')),
     ['arxiv2.parquet: cannot read this file type']),
    ('data_prep', 'bz2-in-folder', prep_case(_both(_rename('wiki.jsonl', 'wiki/a.jsonl'), _write('wiki/b.jsonl.xz', b'x'))),
     ['wiki/b.jsonl.xz: cannot read this file type']),
    ('data_prep', 'non-utf8', prep_case(_write('github.jsonl', b'{"text": "caf\xe9"}\n')),
     ['github.jsonl:1: not UTF-8 text']),
    ('data_prep', 'binary-file', prep_case(_write('github.jsonl', bytes(range(256)) * 4)),
     ['github.jsonl:1: not UTF-8']),
    ('data_prep', 'truncated-gz', prep_case(_both(_gzip_of('wiki.jsonl', 'wiki.jsonl.gz', cut=60),
                                                  lambda p: (p / 'wiki.jsonl').unlink())),
     ['wiki.jsonl.gz: cannot be read']),
    ('data_prep', 'truncated-zst', prep_case(_zstd_truncated('arxiv.jsonl')), ['arxiv.jsonl.zst: cannot be read']),
    ('data_prep', 'bad-json-line', prep_case(_write('wiki.jsonl', b'{"text": "a"}\n{oops\n')),
     ['wiki.jsonl:2: not valid JSON']),
    ('data_prep', 'no-text-field', prep_case(_write('wiki.jsonl', b'{"content": "a"}\n')),
     ['wiki.jsonl:1: JSON object without a "text" field']),
    ('data_prep', 'text-not-string', prep_case(_write('wiki.jsonl', b'{"text": 3}\n')),
     ['wiki.jsonl:1: "text" must be a string']),
    ('data_prep', 'empty-file', prep_case(_write('wiki.jsonl', b'')), ['wiki.jsonl: no documents']),
    ('data_prep', 'too-small-domain', prep_case(_write('github.jsonl', b'{"text": "tiny"}\n')),
     ["domain 'github': only 0 samples", '--min-eval-samples']),
    ('data_prep', 'missing-tokenizer', lambda c, n: _prep(c.corpus, c.case_dir(n) / 'o', tokenizer=str(c.work / 'tok')),
     ['--tokenizer', 'tok: not a local folder', 'nothing is downloaded']),
    ('data_prep', 'no-tokenizer-choice', _prep_cli([]), ['--tokenizer DIR', '--train-tokenizer']),
    ('data_prep', 'bad-max-seq-len', _prep_cli(['--train-tokenizer', '400', '--max-seq-len', '1']),
     ['--max-seq-len must be >= 2']),
    ('data_prep', 'bad-eval-fraction', _prep_cli(['--train-tokenizer', '400', '--eval-fraction', '1.5']),
     ['--eval-fraction']),
    # data_prep: stale or mixed builds (issue item 2)
    ('data_prep', 'stale-content', prep_rebuild_case(_append_doc), ['wiki.jsonl changed', '--overwrite']),
    ('data_prep', 'other-seed', prep_rebuild_case(lambda p: None, settings=PrepSettings(**{**SETTINGS.__dict__,
                                                                                          'seed': 5})),
     ['setting seed: 17 -> 5']),
    ('data_prep', 'partial-overwrite', prep_rebuild_case(lambda p: None, domains=['wiki'], train_tokenizer_vocab=300,
                                                         overwrite=True),
     ["lacks its domains ['arxiv', 'github']"]),
    ('data_prep', 'not-a-data-prep-folder', _not_ours, ['mine', 'has no manifest.json']),
    ('data_prep', 'foreign-files', _foreign_in_data_root, ["holds ['runs']", 'did not write']),
    # train.py configs: component errors before the model (issue item 6)
    ('train', 'top-level-typo', config_case(_set('max_durration', '4ba')), ['max_durration', "'max_duration'"]),
    ('train', 'callback-key-typo', config_case(_set('callbacks.drp_dynamic_loading.policy.rhoo', 0.2)),
     ['drp_dynamic_loading.policy', 'rhoo', "'rho'"]),
    ('train', 'unknown-policy', config_case(_set('callbacks.drp_dynamic_loading.policy.name', 'drprunning')),
     ['drp_dynamic_loading.policy', 'drprunning']),
    ('train', 'key-of-another-policy', config_case(_set('callbacks.drp_dynamic_loading.policy.name', 'constant')),
     ['drp_dynamic_loading', "policy 'constant'"]),
    ('train', 'reference-losses-domain', config_case(_set('callbacks.drp_dynamic_loading.policy.reference_losses',
                                                          {'arxiv': 2.0, 'github': 2.0, 'wikipedia': 2.0})),
     ['drp_dynamic_loading.policy', 'reference_losses', 'wikipedia']),
    ('train', 'reference-losses-count', config_case(_set('callbacks.drp_dynamic_loading.policy.reference_losses', [2.0, 3.0])),
     ['drp_dynamic_loading.policy', 'reference_losses', 'one entry per domain (3)']),
    ('train', 'target-unreachable', config_case(_set('algorithms.drp_mask_learner.target.layers', 9)),
     ['drp_mask_learner.target', 'layers']),
    ('train', 'target-key-typo', config_case(_set('algorithms.drp_mask_learner.target.layer', 3)),
     ['drp_mask_learner.target', 'layer']),
    ('train', 'mask-lr-negative', config_case(_set('algorithms.drp_mask_learner.mask_lr', -1.0)),
     ['drp_mask_learner.mask_lr must be > 0']),
    ('train', 'bad-granularity', config_case(_set('algorithms.drp_mask_learner.granularities', ['heads'])),
     ['drp_mask_learner.granularities']),
    ('train', 'bad-eval-mask-mode', config_case(_set('algorithms.drp_mask_learner.eval_mask_mode', 'mean')),
     ['drp_mask_learner.eval_mask_mode']),
    ('train', 'warmup-units', config_case(_set('algorithms.drp_lagrangian.warmup_steps', '100tok')),
     ['drp_lagrangian.warmup_steps must count batches']),
    ('train', 'jsonl-path-empty', config_case(_set('loggers.drp_jsonl.path', '')), ['drp_jsonl.path']),
    ('train', 'proportions-sum', config_case(_set('train_loader.dataset.proportions', [0.5, 0.3, 0.3])),
     ['train_loader.dataset.proportions']),
    ('train', 'dataset-key-typo', config_case(_set('train_loader.dataset.shufle_seed', 3)),
     ['train_loader.dataset.shufle_seed', "'shuffle_seed'"]),
    ('train', 'duplicate-eval-label', config_case(_set('eval_loaders.1.label', 'arxiv')), ["labels ['arxiv']"]),
    ('train', 'max-duration-epochs', config_case(_set('max_duration', '1ep')), ['max_duration: 1ep', 'in batches']),
    ('train', 'missing-tokenizer-folder', config_case(_set('tokenizer.name', '/nowhere/tokenizer')),
     ['tokenizer.name', '/nowhere/tokenizer does not exist']),
    ('train', 'missing-model-folder', config_case(_set('model.pretrained_model_name_or_path', './models/nope')),
     ['model.pretrained_model_name_or_path', './models/nope does not exist']),
    ('train', 'model-vocab-too-small', config_case(_small_vocab_model), ['vocab_size 1024', '2048 tokens']),
    # train.py configs: combinations accepted before (issue item 7)
    ('train', 'masks-without-lagrangian', config_case(_set('algorithms.drp_lagrangian', _DELETE)),
     ['drp_mask_learner without algorithms.drp_lagrangian', 'never moves']),
    ('train', 'lagrangian-without-masks', config_case(_set('algorithms.drp_mask_learner', _DELETE)),
     ['drp_lagrangian needs algorithms.drp_mask_learner']),
    ('train', 'warmup-longer-than-run', config_case(_set('algorithms.drp_lagrangian.warmup_steps', 40)),
     ['drp_lagrangian.warmup_steps: 40 batches is longer than the run', '12 batches']),
    ('train', 'seq-len-differs', config_case(_set('max_seq_len', 64)), ['max_seq_len: 64', 'built with max_seq_len 32']),
    ('train', 'loader-seq-len-differs', config_case(_set('train_loader.dataset.max_seq_len', 16)),
     ['train_loader.dataset.max_seq_len: 16', 'max_seq_len 32']),
    # train.py configs: the data root (issue item 2)
    ('train', 'no-manifest', config_case(_with_data(lambda d: (d / 'manifest.json').unlink())),
     ['train_loader.dataset.data_root', 'has no manifest.json']),
    ('train', 'unfinished-build', config_case(_with_data(lambda d: ((d / 'manifest.json').unlink(),
                                                                    (d / '.building').write_text('x')))),
     ['unfinished build', '.building']),
    ('train', 'domain-not-in-manifest', config_case(_with_data(_edit_manifest(
        domains=lambda m: {k: v for k, v in m['domains'].items() if k != 'github'}))),
     ["domains ['github'] are not in", 'manifest.json']),
    ('train', 'other-tokenizer', config_case(_other_tokenizer), ['tokenizer.name', 'is not the tokenizer']),
    ('train', 'stale-source', config_case(_stale_source), ['wiki.jsonl changed since', 'stale']),
    ('train', 'train-py-exits-before-building', _train_entry(_set('algorithms.drp_mask_learner.target.hidden', 500)),
     ['drp_mask_learner.target', 'hidden']),
    ('train', 'train-py-no-manifest', _train_entry(_with_data(lambda d: (d / 'manifest.json').unlink())),
     ['has no manifest.json']),
    # export (issue item 4)
    ('export', 'missing-checkpoint', export_case(lambda f: ([str(f / 'nope.pt'), str(f / 'out')], None)),
     ['nope.pt does not exist']),
    ('export', 'folder-not-checkpoint', export_case(lambda f: ((f / 'ck').mkdir() or [str(f / 'ck'), str(f / 'o')], None)),
     ['holds no .metadata file']),
    ('export', 'garbage-file', export_case(lambda f: ((f / 'x.pt').write_bytes(b'junk') and None) or
                                           ([str(f / 'x.pt'), str(f / 'o')], f / 'x.pt')),
     ['x.pt with torch.load']),
    ('export', 'no-masks', export_case(lambda f: ([str(_fake_checkpoint(f / 'plain.pt')), str(f / 'o')], None)),
     ['plain.pt carries no pruning masks']),
    ('export', 'out-is-a-file', export_case(lambda f: ((f / 'o').write_text('x') and None) or
                                            ([str(_fake_checkpoint(f / 'c.pt', True)), str(f / 'o')], f / 'o')),
     ['exists and is not a directory']),
    ('export', 'into-run-folder', export_case(lambda f: ([str(_run_folder(f) / 'checkpoints' / 'ep0-ba4-rank0.pt'),
                                                          str(f / 'run'), '--overwrite'], f / 'run' / 'metrics.jsonl')),
     ['holds the input', 'ep0-ba4-rank0.pt']),
    ('export', 'into-folder-with-checkpoints', export_case(lambda f: (
        [str(_fake_checkpoint(f / 'c.pt', True)), str(_run_folder(f)), '--overwrite'], f / 'run' / 'checkpoints')),
     ['holds a checkpoint', 'ep0-ba4-rank0.pt']),
    ('export', 'non-empty-no-overwrite', export_case(lambda f: (
        (f / 'o').mkdir() or (f / 'o' / 'x').write_text('x') and None) or
        ([str(_fake_checkpoint(f / 'c.pt', True)), str(f / 'o')], f / 'o' / 'x')),
     ['not empty; pass --overwrite']),
    ('export', 'overwrite-non-export-cli', export_case(lambda f: (
        (f / 'o').mkdir() or (f / 'o' / 'x').write_text('x') and None) or
        ([str(_fake_checkpoint(f / 'c.pt', True)), str(f / 'o'), '--overwrite'], f / 'o' / 'x')),
     ['is not an earlier export (no pruning_report.json)']),
    ('export', 'tokenizer-inside-out', export_case(lambda f: (
        (f / 'o' / 'tok').mkdir(parents=True) and None) or
        ([str(_fake_checkpoint(f / 'c.pt', True)), str(f / 'o'), '--overwrite', '--tokenizer', str(f / 'o' / 'tok')],
         f / 'o' / 'tok')),
     ['holds the input', 'tok']),
    # eval tools (issue item 6)
    ('eval', 'domain-loss-missing-model', domain_loss_case(lambda c, f: [str(f / 'pruned'), str(c.data),
                                                                         '--max-seq-len', '32']),
     ['MODEL_DIR', 'pruned does not exist']),
    ('eval', 'domain-loss-missing-data', domain_loss_case(lambda c, f: [TINY_MODEL, str(f / 'data'),
                                                                        '--max-seq-len', '32']),
     ['DATA_ROOT', 'data does not exist']),
    ('eval', 'domain-loss-unknown-domain', domain_loss_case(lambda c, f: [TINY_MODEL, str(c.data), '--domains', 'math',
                                                                          '--max-seq-len', '32']),
     ["--domains ['math']"]),
    ('eval', 'domain-loss-seq-len', domain_loss_case(lambda c, f: [TINY_MODEL, str(c.data), '--max-seq-len', '64']),
     ['--max-seq-len 64', 'max_seq_len 32']),
    ('eval', 'score-missing-model', eval_cli_case(lambda c, f: ['score', str(f / 'm'), str(f / 'items.jsonl')]),
     ['MODEL_DIR', 'no config.json']),
    ('eval', 'score-missing-items', eval_cli_case(lambda c, f: ['score', TINY_MODEL, str(f / 'items.jsonl')]),
     ['items.jsonl does not exist']),
    ('eval', 'build-missing-data', eval_cli_case(lambda c, f: ['build', '--data', str(f / 'held_out'), '--out',
                                                               str(f / 'i.jsonl'), '--offline']),
     ['held_out does not exist']),
    ('eval', 'build-offline-and-llm', eval_cli_case(lambda c, f: ['build', '--data', str(c.corpus), '--out',
                                                                  str(f / 'i.jsonl'), '--offline', '--llm-model', 'x']),
     ['--offline', '--llm-base-url']),
]


@pytest.mark.parametrize('area,case_id,run,expected', CASES, ids=[f'{a}-{i}' for a, i, *_ in CASES])
def test_bad_input_is_refused_with_a_message_naming_it(ctx, area, case_id, run, expected):
    message = run(ctx, f'{area}-{case_id}')
    for fragment in expected:
        assert fragment in message, f'{fragment!r} not in: {message}'


# --- issue 28: nothing written is lost, integrity, identity, a scheduler that can act, typed values ----------
# Each row: ``setup(c, folder)`` builds what the row needs in its own folder and returns ``attempt()``, which
# makes the mistake and returns the message. ``intact`` hashes that folder and the shared data root before
# and after the attempt: every file written before is byte-identical afterwards. Rows that go through a
# tool that could build the model assert it was not built.

def _digest(*folders: Path) -> dict[str, str]:
    import hashlib

    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else 'link'
            for folder in folders for p in sorted(folder.rglob('*')) if p.is_file() or p.is_symlink()}


def intact(setup: Callable[[Ctx, Path], Callable[[], str]], trains: bool = False) -> Callable[[Ctx, str], str]:
    """``trains``: the setup uses the finished training run (``trained_run``), so the row is an end-to-end run."""
    def run(c: Ctx, name: str) -> str:
        folder = c.case_dir(name)
        attempt = setup(c, folder)
        before = _digest(folder, c.data)
        message = attempt()
        assert _digest(folder, c.data) == before, 'a file written before changed'
        return message
    run.trains = trains
    return run


def _config_error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as err:
        check_train_config(om.create(cfg))
    return str(err.value)


def preflight(edit: Callable[[dict, Ctx, Path], None]) -> Callable[[Ctx, str], str]:
    """A config (and data) mistake refused by the pre-flight (no model exists yet)."""
    def setup(c: Ctx, folder: Path) -> Callable[[], str]:
        cfg = copy.deepcopy(c.config)
        edit(cfg, c, folder)
        return lambda: _config_error(cfg)
    return intact(setup)


_TRAINED: dict[str, Path] = {}


def trained_run(c: Ctx) -> Path:
    """One finished tiny run (12 batches, checkpoints every 2) of the table's data, made once."""
    current = os.environ.get('PYTEST_CURRENT_TEST', '')
    assert any(f'[{row}]' in current for row in _TRAINING_ROWS), \
        f'{current} uses the finished training run: build its row with intact(..., trains=True) (marks it slow)'
    if 'run' not in _TRAINED:
        # train.py in a fresh interpreter, as a user runs it. In this process it would be faster, but its train
        # loader forks a persistent DataLoader worker from the pytest-xdist worker, whose threads may hold a lock
        # at the fork, and Composer changes process-wide state (environment, process group)
        from resume_harness import uninterrupted

        _TRAINED['run'] = uninterrupted(c.work / 'trained', c.data)['run_dir']
    return _TRAINED['run']


def _run_copy(c: Ctx, folder: Path, latest: int | None = None) -> tuple[dict, Path]:
    """A copy of the trained run (its checkpoints) and its config; ``latest`` re-points latest-rank0.pt."""
    from resume_harness import write_config

    run_dir = folder / 'run'
    shutil.copytree(trained_run(c), run_dir, symlinks=True)
    if latest is not None:
        link = run_dir / 'checkpoints' / 'latest-rank0.pt'
        link.unlink()
        link.symlink_to(f'ep0-ba{latest}-rank0.pt')
    cfg = json.loads(write_config(folder / 'cfg.yaml', c.data, run_dir).read_text())
    return cfg, run_dir


def resume_case(edit: Callable[[dict, Path], None], latest: int | None = 6) -> Callable[[Ctx, str], str]:
    def setup(c: Ctx, folder: Path) -> Callable[[], str]:
        cfg, run_dir = _run_copy(c, folder, latest)
        edit(cfg, run_dir)
        return lambda: _config_error(cfg)
    return intact(setup, trains=True)


def _damage(rel: str, how: str) -> Callable[[dict, Path], None]:
    def edit(cfg: dict, run_dir: Path) -> None:
        path = (run_dir / 'checkpoints' / rel).resolve()
        if how == 'truncate':
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 3])
        else:  # NaN into one weight, the file otherwise a valid checkpoint
            checkpoint = torch.load(path, map_location='cpu', weights_only=False)
            tensor = checkpoint['state']['model'][how]
            tensor.view(-1)[0] = float('nan')
            torch.save(checkpoint, path)
    return edit


def train_py(setup_cfg: Callable[[Ctx, Path], dict]) -> Callable[[Ctx, str], str]:
    """The real train.py: refused (exit != 0) without a traceback and before LLM-Foundry builds anything."""
    def setup(c: Ctx, folder: Path) -> Callable[[], str]:
        cfg = setup_cfg(c, folder)
        (folder / 'cfg.yaml').write_text(json.dumps(cfg))

        def attempt() -> str:
            return refused_train_run(folder)
        return attempt
    return intact(setup, trains=setup_cfg in (_finished_run, _damaged_run))


_HOLDERS: list = []


def _locked_by_another(c: Ctx, folder: Path) -> dict:
    """A live process holds the save_folder's lock (as a running train.py does)."""
    cfg = copy.deepcopy(c.config)
    cfg['save_folder'] = str(folder / 'run' / 'checkpoints')
    code = ('import sys, time; from drp_foundry.run_lock import hold_run_lock; h = hold_run_lock(sys.argv[1]); '
            'print("held", flush=True); time.sleep(300)')
    proc = subprocess.Popen([sys.executable, '-c', code, cfg['save_folder']], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'held'
    _HOLDERS.append(proc)
    (folder / 'holder.pid').write_text(str(proc.pid))
    return cfg


def _finished_run(c: Ctx, folder: Path) -> dict:
    cfg, _ = _run_copy(c, folder)
    return cfg


def _damaged_run(c: Ctx, folder: Path) -> dict:
    cfg, run_dir = _run_copy(c, folder, latest=6)
    _damage('latest-rank0.pt', 'truncate')(cfg, run_dir)
    return cfg


def _in_process(fn: Callable[[], None], error: type, no_model: list[str]) -> str:
    """Call ``fn``; it must raise ``error`` without ``no_model`` (dotted names of model builders) being called."""
    from contextlib import ExitStack
    from unittest import mock

    with ExitStack() as stack:
        for target in no_model:
            stack.enter_context(mock.patch(target, side_effect=AssertionError(f'the model was built ({target})')))
        with pytest.raises(error) as err:
            fn()
    return str(err.value)


def _earlier_export(folder: Path, *extra: str) -> Path:
    """An earlier export's folder (its report lists what it wrote), plus files a user added."""
    out = folder / 'exported'
    out.mkdir()
    (out / 'config.json').write_text('{}')
    (out / 'model.safetensors').write_bytes(b'weights')
    (out / 'pruning_report.json').write_text(json.dumps(
        {'written_files': ['config.json', 'model.safetensors', 'pruning_report.json']}))
    for rel in extra:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text('mine')
    return out


def export_overwrite_case(c: Ctx, folder: Path) -> Callable[[], str]:
    from drp_foundry.export import ExportError, export_checkpoint

    out = _earlier_export(folder, 'domain_losses.json', 'eval/notes.md')
    checkpoint = _fake_checkpoint(folder / 'c.pt', masks=True)
    return lambda: _in_process(lambda: export_checkpoint(checkpoint, out, overwrite=True), ExportError,
                               ['drp_foundry.export.build_masked_model'])


_TARGET = 'layers=3,hidden=64,heads=3,kv_heads=1,intermediate=128'


def oneshot_overwrite_case(c: Ctx, folder: Path) -> Callable[[], str]:
    from drp_foundry.oneshot import OneShotError, parse_target, prune_directory

    out = _earlier_export(folder, 'notes.txt')
    return lambda: _in_process(lambda: prune_directory(TINY_MODEL, out, parse_target(_TARGET), c.data,
                                                       overwrite=True), OneShotError,
                               ['transformers.AutoModelForCausalLM.from_pretrained'])


def _other_tokenizer_dir(folder: Path, vocab: int = 300) -> Path:
    from data_prep.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(['some other text for another tokenizer'] * 50, vocab_size=vocab, out_dir=folder / 'tok')
    return folder / 'tok'


def _model_with_tokenizer(folder: Path) -> Path:
    """The tiny model's config with a tokenizer that is not the data's."""
    model = folder / 'model'
    model.mkdir()
    shutil.copy(REPO / 'yamls/demo/models/tiny-gqa/config.json', model / 'config.json')
    for p in _other_tokenizer_dir(folder).iterdir():
        shutil.copy(p, model / p.name)
    return model


def oneshot_tokenizer_case(c: Ctx, folder: Path) -> Callable[[], str]:
    from drp_foundry.oneshot import OneShotError, parse_target, prune_directory

    model = _model_with_tokenizer(folder)
    return lambda: _in_process(lambda: prune_directory(model, folder / 'out', parse_target(_TARGET), c.data),
                               OneShotError, ['transformers.AutoModelForCausalLM.from_pretrained'])


def domain_loss_tokenizer_case(c: Ctx, folder: Path) -> Callable[[], str]:
    import contextlib
    import io

    from drp_foundry.commands.domain_loss import main

    model = _model_with_tokenizer(folder)

    def attempt() -> str:
        from unittest import mock

        err = io.StringIO()
        with contextlib.redirect_stderr(err), mock.patch(
                'drp_foundry.composer.domain_eval_losses.evaluate_domains', side_effect=AssertionError('model built')):
            assert main([str(model), str(c.data), '--max-seq-len', '32']) == 2
        return err.getvalue()
    return attempt


def export_real_case(args: Callable[[Path, Path], list[str]]) -> Callable[[Ctx, str], str]:
    """drp-export of the trained run's last checkpoint with ``args(folder, checkpoint)`` after it."""
    def setup(c: Ctx, folder: Path) -> Callable[[], str]:
        from drp_foundry.export import ExportError

        checkpoint = (trained_run(c) / 'checkpoints' / 'latest-rank0.pt').resolve()
        extra = args(folder, checkpoint)

        def attempt() -> str:
            from drp_foundry.export import export_checkpoint

            kwargs = dict(zip(extra[::2], extra[1::2]))
            return _in_process(lambda: export_checkpoint(kwargs.pop('checkpoint', checkpoint), folder / 'out',
                                                         **kwargs),
                               ExportError, ['drp_foundry.export.build_masked_model'])
        return attempt
    return intact(setup, trains=True)


def _nan_masks_checkpoint(folder: Path, checkpoint: Path) -> list:
    state = torch.load(checkpoint, map_location='cpu', weights_only=False)
    name = next(k for k in state['state']['model'] if 'log_alpha' in k)
    state['state']['model'][name].view(-1)[0] = float('nan')
    torch.save(state, folder / 'nan.pt')
    return ['checkpoint', folder / 'nan.pt']


def _source_of_other_width(folder: Path, checkpoint: Path) -> list:
    config = json.loads((REPO / 'yamls/demo/models/tiny-gqa/config.json').read_text())
    config['hidden_size'] = 2 * config['hidden_size']
    (folder / 'src').mkdir()
    (folder / 'src' / 'config.json').write_text(json.dumps(config))
    return ['source', str(folder / 'src')]


def _replace_split(domain: str, settings: PrepSettings | None = None, tokenizer_vocab: int = 2048):
    """Replace ``domain``'s train shards with those of another build (manifest kept)."""
    def change(data: Path) -> None:
        corpus = data.parent / 'corpus-other'
        shutil.copytree(data.parent.parent.parent / 'corpus', corpus)
        other = data.parent / 'other-build'
        build_domain_mds(corpus, other, train_tokenizer_vocab=tokenizer_vocab,
                         settings=settings or PrepSettings(max_seq_len=32, max_train_samples=80, max_eval_samples=4))
        shutil.rmtree(data / domain / 'train')
        shutil.copytree(other / domain / 'train', data / domain / 'train')
    return change


def _cut_shard(domain: str, keep: float) -> Callable[[Path], None]:
    def change(data: Path) -> None:
        shard = data / domain / 'train' / 'shard.00000.mds'
        raw = shard.read_bytes()
        if keep == 0:
            shard.unlink()
        else:
            shard.write_bytes(raw[:int(len(raw) * keep)])
    return change


def _big_token_ids(domain: str) -> Callable[[Path], None]:
    """Same size, other bytes: the last samples' tokens set to an id beyond any vocabulary."""
    def change(data: Path) -> None:
        shard = data / domain / 'train' / 'shard.00000.mds'
        raw = bytearray(shard.read_bytes())
        raw[-64:] = (10 ** 6).to_bytes(4, 'little') * 16
        shard.write_bytes(bytes(raw))
    return change


def dataset_case(change: Callable[[Path], None], vocab_size: int | None = None) -> Callable[[Ctx, str], str]:
    """The drp_multidomain dataset itself reading changed shards (remote data has no pre-flight of its files)."""
    def setup(c: Ctx, folder: Path) -> Callable[[], str]:
        from streaming import Stream

        from drp_foundry.data.multidomain_dataset import MultiDomainStreamingDataset

        data = folder / 'data'
        shutil.copytree(c.data, data)
        change(data)

        def attempt() -> str:
            dataset = MultiDomainStreamingDataset(
                domain_names=['arxiv', 'github', 'wiki'],
                streams=[Stream(local=str(data / d), split='train') for d in ('arxiv', 'github', 'wiki')],
                proportions=[0.0, 0.0, 1.0], max_seq_len=32, device_batch_size=4, world_size=1, rank=0)
            dataset.vocab_size, dataset.sample_length = vocab_size, 32
            with pytest.raises(RuntimeError) as err:
                for _ in zip(range(400), iter(dataset)):
                    pass
            return str(err.value)
        return attempt
    return intact(setup)


def _no_finite_eval(c: Ctx, folder: Path) -> Callable[[], str]:
    import numpy as np

    from drp_foundry.composer.dynamic_loading import check_eval_losses_finite

    class _Metric:
        update_called = True

    class _State:
        eval_metrics = {'eval/arxiv': {'LanguageCrossEntropy': _Metric()},
                        'eval/wiki': {'LanguageCrossEntropy': _Metric()}}
        timestamp = type('T', (), {'batch': type('B', (), {'value': 4})()})()

    return lambda: _in_process(lambda: check_eval_losses_finite(_State(), ['arxiv', 'wiki'],
                                                                np.array([2.0, np.nan]), 'LanguageCrossEntropy'),
                               ValueError, [])


ISSUE28_CASES = [
    # nothing written is lost (Build 1)
    ('lost', 'export-overwrite-keeps-user-files', intact(export_overwrite_case),
     ['holds files the earlier export did not write', 'domain_losses.json', 'eval/notes.md']),
    ('lost', 'oneshot-overwrite-keeps-user-files', intact(oneshot_overwrite_case),
     ['did not write', 'notes.txt']),
    ('lost', 'second-run-same-save-folder', train_py(_locked_by_another),
     ['is in use by a live run', 'run/checkpoints', 'pid ']),
    ('lost', 'rerun-of-a-finished-run', train_py(_finished_run),
     ['max_duration: 12ba', 'saved at batch 12', 'nothing is left to train']),
    ('lost', 'unreadable-checkpoint', resume_case(_damage('latest-rank0.pt', 'truncate')),
     ['cannot read checkpoint', 'ep0-ba6-rank0.pt', 'earlier checkpoints', 'ep0-ba4-rank0.pt']),
    ('lost', 'train-py-unreadable-checkpoint', train_py(_damaged_run),  # metrics, plots, lock file: all unchanged
     ['save_folder (autoresume)', 'cannot read checkpoint', 'ep0-ba6-rank0.pt', 'ep0-ba4-rank0.pt']),
    # integrity from data to export (Build 2)
    ('integrity', 'truncated-shard', preflight(_with_data(_cut_shard('wiki', 0.5))),
     ["domain 'wiki' (train)", 'wiki/train/shard.00000.mds', 'truncated']),
    ('integrity', 'missing-shard', preflight(_with_data(_cut_shard('github', 0))),
     ["domain 'github' (train)", 'github/train/shard.00000.mds is missing']),
    ('integrity', 'shards-of-another-tokenizer', preflight(_with_data(_replace_split('arxiv', tokenizer_vocab=300))),
     ["domain 'arxiv' (train)", 'arxiv/train/index.json is not the one data_prep wrote']),
    ('integrity', 'shards-of-another-seq-len', preflight(_with_data(_replace_split(
        'wiki', PrepSettings(max_seq_len=16, max_train_samples=80, max_eval_samples=4)))),
     ["domain 'wiki' (train)", 'wiki/train/index.json']),
    ('integrity', 'token-ids-beyond-vocab', preflight(_with_data(_big_token_ids('wiki'))),
     ["domain 'wiki' (train)", 'shard.00000.mds has other content']),
    ('integrity', 'dataset-token-ids-beyond-vocab', dataset_case(_big_token_ids('wiki'), vocab_size=2048),
     ["domain 'wiki'", 'wiki/train/shard.00000.mds', 'beyond the tokenizer']),
    ('integrity', 'dataset-truncated-shard', dataset_case(_cut_shard('wiki', 0.5)),
     ["domain 'wiki'", 'wiki/train/shard.00000.mds', 'cannot be read']),
    ('integrity', 'checkpoint-nan-weights', resume_case(_damage('latest-rank0.pt', 'model.model.embed_tokens.weight')),
     ['non-finite values', 'model.model.embed_tokens.weight', 'ep0-ba6-rank0.pt']),
    ('integrity', 'export-nan-masks', export_real_case(_nan_masks_checkpoint),
     ['nan.pt holds non-finite values', 'log_alpha']),
    # identity everywhere (Build 3)
    ('identity', 'oneshot-calibration-other-tokenizer', intact(oneshot_tokenizer_case),
     ['--calibration', 'not with the tokenizer of MODEL']),
    ('identity', 'domain-loss-other-tokenizer', intact(domain_loss_tokenizer_case),
     ['DATA_ROOT', 'not with the tokenizer of MODEL_DIR']),
    ('identity', 'export-tokenizer-of-another-vocab', export_real_case(
        lambda f, ck: ['tokenizer_dir', str(_other_tokenizer_dir(f))]),
     ['--tokenizer', 'not the one the checkpoint stores']),
    ('identity', 'export-source-of-another-model', export_real_case(_source_of_other_width),
     ['--source', 'not the model this checkpoint was pruned from', 'hidden_size']),
    ('identity', 'resume-other-policy', resume_case(
        lambda cfg, r: cfg['callbacks']['drp_dynamic_loading']['policy'].update(name='constant', reference_losses=None,
                                                                                fit_start_fraction=None,
                                                                                ratio_start_fraction=None,
                                                                                history_start_fraction=None,
                                                                                min_fit_points=None)),
     ['callbacks.drp_dynamic_loading.policy', "name: 'drpruning' -> 'constant'"]),
    ('identity', 'resume-other-target-ramp', resume_case(
        lambda cfg, r: cfg['algorithms']['drp_lagrangian'].update(warmup_steps=6)),
     ['algorithms.drp_lagrangian.warmup_steps', 'ramped over 8', 'warmup_steps: 8']),
    ('identity', 'resume-other-proportions', resume_case(
        lambda cfg, r: cfg['train_loader']['dataset'].update(proportions=[0.2, 0.4, 0.4])),
     ['train_loader.dataset.proportions', 'started from the mixture']),
    ('identity', 'resume-other-shuffle-seed', resume_case(
        lambda cfg, r: cfg['train_loader']['dataset'].update(shuffle_seed=6)),
     ['train_loader.dataset.shuffle_seed: 6', 'used 5']),
    ('identity', 'resume-other-target', resume_case(
        lambda cfg, r: cfg['algorithms']['drp_mask_learner']['target'].update(layers=2)),
     ['algorithms.drp_mask_learner.target', 'trained toward']),
    # a scheduler that cannot act (Build 4)
    ('scheduler', 'eval-interval-longer-than-run', preflight(_set('eval_interval', '20ba')),
     ['eval_interval: 20ba', 'no eval inside the run', 'max_duration 12 batches']),
    ('scheduler', 'eval-interval-equal-to-run', preflight(_set('eval_interval', '12ba')),
     ['eval_interval: 12ba', 'only after the last batch']),
    ('scheduler', 'eval-interval-in-epochs', preflight(_set('eval_interval', '1ep')),
     ['eval_interval: 1ep is not in batches']),
    ('scheduler', 'eval-interval-integer', preflight(_set('eval_interval', 2)),
     ['eval_interval: 2', 'Composer reads an integer as epochs', 'in batches']),
    ('scheduler', 'eval-interval-not-set', preflight(_set('eval_interval', _DELETE)),
     ['eval_interval: not set (LLM-Foundry default 1)', 'epochs']),
    ('scheduler', 'loss-metric-typo', preflight(_set('callbacks.drp_dynamic_loading.loss_metric',
                                                     'LanguageCrossEntropyy')),
     ['callbacks.drp_dynamic_loading.loss_metric', "'LanguageCrossEntropyy'", "did you mean 'LanguageCrossEntropy'",
      'LanguagePerplexity']),
    ('scheduler', 'negative-reference-loss', preflight(_set('callbacks.drp_dynamic_loading.policy.reference_losses',
                                                            {'arxiv': -1.0, 'github': 2.0, 'wiki': 2.0})),
     ['drp_dynamic_loading.policy', 'reference_losses', '>= 0', "'arxiv': -1.0"]),
    ('scheduler', 'infinite-reference-loss', preflight(_set('callbacks.drp_dynamic_loading.policy.reference_losses',
                                                            {'arxiv': float('inf'), 'github': 2.0, 'wiki': 2.0})),
     ['drp_dynamic_loading.policy', 'reference_losses', 'finite']),
    ('scheduler', 'evals-give-no-finite-loss', intact(_no_finite_eval),
     ["eval loaders of ['wiki'] ran but gave no finite LanguageCrossEntropy", 'batch 4']),
    # every value checked by type, or used, or refused (Build 5)
    ('types', 'mask-lr-word', preflight(_set('algorithms.drp_mask_learner.mask_lr', 'fast')),
     ["algorithms.drp_mask_learner.mask_lr: 'fast' is str", 'a number']),
    ('types', 'log-images-word', preflight(_set('callbacks.drp_dynamic_loading.log_images', 'yes')),
     ["callbacks.drp_dynamic_loading.log_images: 'yes' is str", 'true or false']),
    ('types', 'policy-rho-word', preflight(_set('callbacks.drp_dynamic_loading.policy.rho', 'high')),
     ["callbacks.drp_dynamic_loading.policy.rho: 'high' is str"]),
    ('types', 'calibration-batches-float', preflight(_set('algorithms.drp_mask_learner.calibration_batches', 2.5)),
     ['algorithms.drp_mask_learner.calibration_batches: 2.5 is float', 'an integer']),
    ('types', 'text-train-loader-under-scheduler', preflight(lambda cfg, c, f: cfg.update(train_loader={
        'name': 'text', 'drop_last': True, 'num_workers': 0,
        'dataset': {'local': str(c.data / 'wiki'), 'split': 'train', 'max_seq_len': 32, 'shuffle': True}})),
     ['callbacks.drp_dynamic_loading needs train_loader.name: drp_multidomain', "'text'"]),
    ('types', 'domain-names-order', preflight(_set('callbacks.drp_dynamic_loading.domain_names',
                                                   ['wiki', 'github', 'arxiv'])),
     ['callbacks.drp_dynamic_loading.domain_names', 'same order']),
    ('types', 'eval-label-not-a-domain', preflight(_set('eval_loaders.2.label', 'wikipedia')),
     ["no eval loader labelled ['wiki']", 'wikipedia']),
]


def test_issue28_rows_cover_every_kind():
    kinds: dict[str, int] = {}
    for kind, *_ in ISSUE28_CASES:
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {'lost', 'integrity', 'identity', 'scheduler', 'types'} and min(kinds.values()) >= 4, kinds
    assert len({i for _, i, *_ in ISSUE28_CASES} | {i for _, i, *_ in CASES}) == len(ISSUE28_CASES) + len(CASES)


_TRAINING_ROWS: set[str] = set()


def _rows(cases: list) -> list:
    """The rows as pytest params; those that copy or export the finished training run (a train.py run of
    about 30 s, made once per worker) are marked ``slow``, like the suite's other end-to-end runs."""
    _TRAINING_ROWS.update(f'{kind}-{case_id}' for kind, case_id, run, _ in cases if run.trains)
    return [pytest.param(*row, id=f'{row[0]}-{row[1]}', marks=[pytest.mark.slow] if row[2].trains else [])
            for row in cases]


@pytest.mark.parametrize('kind,case_id,run,expected', _rows(ISSUE28_CASES))
def test_issue28_mistake_is_refused_naming_it_and_nothing_written_changes(ctx, kind, case_id, run, expected):
    try:
        message = run(ctx, f'i28-{kind}-{case_id}')
    finally:
        while _HOLDERS:
            proc = _HOLDERS.pop()
            proc.kill()
            proc.wait()
    for fragment in expected:
        assert fragment in message, f'{fragment!r} not in: {message}'
