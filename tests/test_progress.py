"""Progress pieces: step rate and ETA, Composer batch lines, durations, data_prep's per-domain bar."""

from __future__ import annotations

import pytest

from data_prep.progress import progress_bar
from drp_foundry.demo.progress import StepTimer, format_duration, parse_batch_line


def test_durations_read_naturally():
    assert [format_duration(s) for s in (0, 42.4, 60, 185, 3599, 3720)] == ['0s', '42s', '1m00s', '3m05s', '59m59s',
                                                                          '1h02m']


def test_composer_batch_lines_give_step_and_total():
    assert parse_batch_line('[batch=12/60]:') == (12, 60)
    assert parse_batch_line('  [batch=7/8]: Train loss/train/total: 3.2') == (7, 8)
    assert parse_batch_line('[Eval batch=1/2] Eval on eval/cc data') is None
    assert parse_batch_line('Train time/batch: 4') is None


def test_the_eta_comes_from_the_rate_since_the_first_step_seen():
    now = [100.0]
    timer = StepTimer(clock=lambda: now[0])
    assert timer.describe() == 'starting'
    timer.update(30, 60)  # a resumed run: its first step seen is 30, the start-up time is not a step
    assert timer.describe() == 'step 30/60' and timer.eta_seconds is None
    now[0] = 120.0
    timer.update(35)
    assert timer.seconds_per_step == pytest.approx(4.0)
    assert timer.eta_seconds == pytest.approx(100.0)
    assert timer.describe() == 'step 35/60, 4.00 s/step, ETA 1m40s'
    now[0] = 220.0
    timer.update(60)
    assert timer.eta_seconds == 0 and timer.describe().endswith('ETA 0s')


def test_bars_stay_out_of_logs_unless_asked(capsys):
    with progress_bar(total=10, desc='quiet') as bar:  # stderr is not a terminal under pytest
        bar.update(10)
    assert 'quiet' not in capsys.readouterr().err
    with progress_bar(total=10, desc='shown', disable=False) as bar:
        bar.update(10)
    assert 'shown' in capsys.readouterr().err


def test_data_prep_shows_a_bar_per_domain(tiny_tokenizer, capsys):
    from data_prep.build_domain_mds import tokens_to_samples

    docs = ['some words here'] * 40 + ['a longer document ' * 20] * 30
    samples = tokens_to_samples(docs, tiny_tokenizer, 16, seed=0, desc='wiki (7/7)', progress=True)
    err = capsys.readouterr().err
    assert 'wiki (7/7)' in err and f'/{sum(len(d) for d in docs) / 1000:.1f}k' in err  # named, sized in characters
    assert 'char/s' in err
    assert samples.shape[1] == 16
    quiet = tokens_to_samples(docs, tiny_tokenizer, 16, seed=0, desc='wiki')
    assert 'wiki' not in capsys.readouterr().err
    assert (quiet == samples).all()  # the bar changes nothing
