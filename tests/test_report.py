"Real training on digits: the final-vs-average report, and which weights the Learner ends with (end_with)"
from pathlib import Path
import pytest, torch
from fastai.callback.core import Callback
from ckpt_avg.save import SaveEvery, SaveEveryNCallback
from ckpt_avg.average import AverageLast
from ckpt_avg.manifest import Manifest
from ckpt_avg.demo import digits_learner
from helpers import fit, state, states_equal, folder


def validate(learn): return [float(v) for v in learn.validate()]

class Final(Callback):
    "Copy the weights the fit ends with, just before AverageLast runs"
    order = SaveEveryNCallback.order + 0.5
    def after_fit(self): self.state = state(self.model)

class Spoil(Callback):
    "At the end of the fit, after the last save and before averaging, scramble the last layer: the final weights become bad"
    order = SaveEveryNCallback.order + 0.5
    def after_fit(self):
        with torch.no_grad(): self.model[-1].weight.mul_(-3.)


def test_report_equals_validate_of_final_and_average(tmp_path):
    learn = digits_learner(path=tmp_path)
    fin, avg = Final(), AverageLast(3, end_with='final')
    fit(learn, 5, [SaveEvery(epochs=1), fin, avg])
    assert avg.holds == 'final' and states_equal(state(learn.model), fin.state)
    assert list(avg.results['final']) == ['valid_loss', 'accuracy']
    assert list(avg.results['final'].values()) == pytest.approx(validate(learn), abs=1e-6)
    learn.load('ckpt_f001_avg')   # the average is still saved
    assert list(avg.results['average'].values()) == pytest.approx(validate(learn), abs=1e-6)
    assert avg.results['average'] != avg.results['final']
    entry = Manifest(folder(learn)).data['averages'][-1]
    assert entry['report'] == avg.results and entry['holds'] == 'final' and entry['end_with'] == 'final'
    assert list(avg.table.index) == ['final weights', 'average'] and avg.table.loc['average', 'accuracy'] == avg.results['average']['accuracy']


def test_default_ends_with_the_average_and_says_so(tmp_path, capsys):
    learn = digits_learner(path=tmp_path)
    avg = AverageLast(3)
    fit(learn, 4, [SaveEvery(epochs=1), avg], quiet=False)
    out = capsys.readouterr().out
    assert 'final weights' in out and 'valid_loss' in out        # the table
    assert "learn.model holds the average weights: end_with='average'" in out
    assert list(avg.results['average'].values()) == pytest.approx(validate(learn), abs=1e-6)


def test_report_off_validates_nothing(tmp_path, capsys):
    learn = digits_learner(path=tmp_path)
    avg = AverageLast(2, report=False)
    fit(learn, 3, [SaveEvery(epochs=1), avg], quiet=False)
    assert avg.results is None and avg.table is None
    assert 'final weights ' not in capsys.readouterr().out
    assert Manifest(folder(learn)).data['averages'][-1]['report'] is None


@pytest.mark.parametrize('monitor', ['valid_loss', 'accuracy'])
def test_better_keeps_the_final_weights_when_they_win(tmp_path, monitor, capsys):
    # the "average" is the epoch-2 checkpoint alone (weights 1,0,0,0): far worse than the epoch-5 weights
    learn = digits_learner(path=tmp_path)
    fin, avg = Final(), AverageLast(4, strategy='weighted', weights=[1, 0, 0, 0], end_with='better', monitor=monitor, report=False)
    fit(learn, 5, [SaveEvery(epochs=1), fin, avg], quiet=False)
    r = avg.results
    assert r['final']['valid_loss'] < r['average']['valid_loss'] - 0.1 and r['final']['accuracy'] > r['average']['accuracy']
    assert avg.holds == 'final' and states_equal(state(learn.model), fin.state)
    assert f"learn.model holds the final weights: its {monitor} on dls.valid" in capsys.readouterr().out


@pytest.mark.parametrize('monitor', ['valid_loss', 'accuracy'])
def test_better_keeps_the_average_when_it_wins(tmp_path, monitor):
    learn = digits_learner(path=tmp_path)
    avg = AverageLast(3, end_with='better', monitor=monitor)
    fit(learn, 5, [SaveEvery(epochs=1), Spoil(), avg])
    r = avg.results
    assert r['average']['valid_loss'] < r['final']['valid_loss'] - 0.1 and r['average']['accuracy'] > r['final']['accuracy']
    assert avg.holds == 'average'
    assert states_equal(state(learn.model), torch.load(folder(learn)/'ckpt_f001_avg.pth'))


def test_direction_override_is_respected(tmp_path):
    # lower_is_better=True on accuracy (wrong on purpose): the worse-accuracy weights win
    learn = digits_learner(path=tmp_path)
    avg = AverageLast(3, end_with='better', monitor='accuracy', lower_is_better=True)
    fit(learn, 5, [SaveEvery(epochs=1), Spoil(), avg])
    assert avg.results['final']['accuracy'] < avg.results['average']['accuracy'] and avg.holds == 'final'


def test_bad_end_with_and_unknown_monitor_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="end_with='best': pass 'average'"): AverageLast(3, end_with='best')
    with pytest.raises(ValueError, match="end_with=.*keep"): AverageLast(3, end_with='keep')
    learn = digits_learner(path=tmp_path)
    before = state(learn.model)
    with pytest.raises(ValueError, match="monitor='f1' is not a value this Learner records; pass one of 'valid_loss', 'accuracy'"):
        fit(learn, 2, [SaveEvery(epochs=1), AverageLast(2, end_with='better', monitor='f1')])
    assert not folder(learn).exists() and states_equal(state(learn.model), before)


def test_a_failure_at_the_end_leaves_the_final_weights_and_no_file(tmp_path):
    # 4 weights, but only 2 saves exist: refused at the end, before the model or any file changes
    learn = digits_learner(path=tmp_path)
    fin = Final()
    with pytest.raises(ValueError, match="got 4 weights but there are only 2 checkpoints"):
        fit(learn, 2, [SaveEvery(epochs=1), fin, AverageLast(4, strategy='weighted', weights=[1, 1, 1, 1])])
    assert states_equal(state(learn.model), fin.state)
    assert not (folder(learn)/'ckpt_f001_avg.pth').exists() and Manifest(folder(learn)).data['averages'] == []


# An EMA in the fit: a third row, validated like the others, and a third candidate for end_with='better'

from ckpt_avg.ema import EMA

def test_ema_row_equals_validate_with_the_ema_weights(tmp_path):
    learn = digits_learner(path=tmp_path)
    ema, avg = EMA(decay=0.9), AverageLast(3, end_with='final')
    fit(learn, 4, [SaveEvery(epochs=1), ema, avg])
    assert list(avg.table.index) == ['final weights', 'average', 'EMA'] and avg.holds == 'final'
    learn.model.load_state_dict(ema.weights())
    assert list(avg.results['ema'].values()) == pytest.approx(validate(learn), abs=1e-6)
    assert avg.results['ema'] != avg.results['final'] and avg.results['ema'] != avg.results['average']
    assert avg.table.loc['EMA', 'valid_loss'] == avg.results['ema']['valid_loss']
    entry = Manifest(folder(learn)).data['averages'][-1]
    assert entry['report'] == avg.results and set(entry['report']) == {'final', 'average', 'ema'}


def test_an_ema_that_never_updated_adds_no_row(tmp_path):
    learn = digits_learner(path=tmp_path)
    ema, avg = EMA(start_at=10), AverageLast(2)
    fit(learn, 2, [SaveEvery(epochs=1), ema, avg])
    assert ema.weights() is None and list(avg.results) == ['final', 'average'] and len(avg.table) == 2


def test_better_ends_with_the_ema_when_it_wins(tmp_path, capsys):
    # the average is the epoch-2 checkpoint alone and the final weights are spoiled: the EMA of the last steps wins
    learn = digits_learner(path=tmp_path)
    ema = EMA(decay=0.5)
    avg = AverageLast(4, strategy='weighted', weights=[1, 0, 0, 0], end_with='better', report=False)
    fit(learn, 5, [SaveEvery(epochs=1), ema, Spoil(), avg], quiet=False)
    best = avg.table['valid_loss'].idxmin()
    assert best == 'EMA' and avg.holds == 'ema' and states_equal(state(learn.model), ema.weights())
    assert Manifest(folder(learn)).data['averages'][-1]['holds'] == 'ema'
    out = capsys.readouterr().out
    assert "learn.model holds the EMA weights: its valid_loss on dls.valid" in out and "the average weights'" in out
    assert "the final weights'" in out


@pytest.mark.parametrize('lower', [True, False])
def test_better_picks_the_best_row_of_three(tmp_path, lower):
    # lower_is_better=False on valid_loss (wrong on purpose) makes the worst row, the spoiled final weights, win
    learn = digits_learner(path=tmp_path)
    fin, ema, avg = Final(), EMA(decay=0.9), AverageLast(3, end_with='better', lower_is_better=lower)
    fit(learn, 4, [SaveEvery(epochs=1), ema, Spoil(), fin, avg])
    col = avg.table['valid_loss']
    assert list(col.index) == ['final weights (reloaded by a callback)', 'average', 'EMA']   # Spoil changed the weights after training
    row = col.idxmin() if lower else col.idxmax()
    want = {col.index[0]: 'final', 'average': 'average', 'EMA': 'ema'}[row]
    assert avg.holds == want and (want == 'final') == (not lower)
    held = dict(final=fin.state, ema=ema.weights(), average=torch.load(folder(learn)/'ckpt_f001_avg.pth'))[want]
    assert states_equal(state(learn.model), held)
    assert validate(learn)[0] == pytest.approx(col[row], abs=1e-6)
