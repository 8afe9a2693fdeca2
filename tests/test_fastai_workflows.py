"SaveEvery and AverageLast in fastai's other workflows (issue 12): attached to the Learner, mixed precision, fine_tune, metric direction, fastai's callbacks, early errors, messages"
import re, threading, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import CSVLogger
from fastai.callback.tracker import SaveModelCallback, EarlyStoppingCallback, ReduceLROnPlateau
from fastai.callback.training import GradientAccumulation
import fastai.callback.schedule  # lr_find, fine_tune, fit_one_cycle
from fastai.interpret import ClassificationInterpretation
from fastai.learner import load_learner
from fastai.metrics import accuracy, rmse, mae
from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize, CategoryBlock
from fastai.torch_core import params
from ckpt_avg.save import SaveEvery, SaveEveryNCallback
from ckpt_avg.average import AverageLast
from ckpt_avg.manifest import Manifest
from ckpt_avg.demo import digits_learner
from helpers import Capture, fit, state, states_equal, mean_of, folder


def table(n=600, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(dict(a=rng.normal(size=n), b=rng.normal(size=n), c=rng.choice(['x', 'y', 'z'], n)))
    df['y'] = (2*df.a - df.b + (df.c == 'x') + rng.normal(scale=0.3, size=n)).astype('float32')
    df['k'] = np.where(df.a + df.b > 0, 'pos', 'neg')
    return df

def tabular(path, target='k', **kw):
    "A small tabular Learner on generated data: a classifier (target 'k') or a regressor with rmse and mae (target 'y')"
    torch.manual_seed(0)
    df = table()
    extra = dict(y_block=CategoryBlock()) if target == 'k' else {}
    dls = TabularDataLoaders.from_df(df, path=path, cont_names=['a', 'b'], cat_names=['c'], y_names=target, procs=[Categorify, Normalize],
                                     bs=64, valid_idx=list(range(480, 600)), **extra)
    metrics = accuracy if target == 'k' else [rmse, mae]
    return tabular_learner(dls, layers=[16], metrics=metrics, n_out=2 if target == 'k' else 1, **kw), df

def files(learn):
    "Every file under the Learner's models folder, with its size and modification time"
    root = folder(learn)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob('*') if p.is_file()} if root.exists() else {}

def no_hang(fn, secs=120):
    "Run `fn` on a thread; fail, instead of hanging the suite, if it has not returned after `secs`"
    res, err = [], []
    def run():
        try: res.append(fn())
        except BaseException as e: err.append(e)
    t = threading.Thread(target=run, daemon=True); t.start(); t.join(secs)
    assert not t.is_alive(), f"{fn} did not return within {secs} s (a deadlock on learn.lock?)"
    if err: raise err[0]
    return res[0]

class Stop(Callback):
    "Raise `exc` after training batch `at` (counted across epochs)"
    def __init__(self, exc, at): self.exc, self.at = exc, at
    def after_batch(self):
        if self.training and self.train_iter == self.at: raise self.exc

def split_cnn(m): return [params(m[:2]), params(m[2:])]  # two parameter groups, so that `freeze` freezes the convolutions


# 1. Attached to the Learner: only training fits
def test_attached_callbacks_take_part_in_training_fits_only(tmp_path):
    learn, df = tabular(tmp_path, cbs=[SaveEvery(epochs=1), AverageLast(2)])
    w0 = state(learn.model)
    learn.export(tmp_path/'before.pkl')  # before any fit
    assert len(learn.dls.train) > 0 and files(learn) == {}
    with learn.no_bar(): no_hang(lambda: learn.lr_find(num_it=12, show_plot=False))
    assert files(learn) == {} and states_equal(state(learn.model), w0), "lr_find wrote checkpoints or changed the weights"
    fit(learn, 3, None)
    m = Manifest(folder(learn))
    assert [f['fit'] for f in m.fits] == [1] and [e['fit'] for e in m.checkpoints] == [1, 1, 1] and len(m.data['averages']) == 1
    after = state(learn.model); on_disk = files(learn); manifest = m.path.read_text()
    def unchanged(what):
        assert states_equal(state(learn.model), after), f"{what} changed the weights"
        assert files(learn) == on_disk and m.path.read_text() == manifest, f"{what} wrote files or changed the manifest"
    steps = dict(validate=lambda: learn.validate(), get_preds=lambda: learn.get_preds(), predict=lambda: learn.predict(df.iloc[0]),
                 show_results=lambda: learn.show_results(), interpretation=lambda: ClassificationInterpretation.from_learner(learn),
                 summary=lambda: learn.summary())
    with learn.no_bar():
        for what, step in steps.items():
            with warnings.catch_warnings():
                warnings.simplefilter('error', UserWarning)  # no "only 1 checkpoint" or any other warning of ours
                warnings.filterwarnings('ignore', message='(?!AverageLast|SaveEvery)')
                no_hang(step)
            unchanged(what)
    opt = learn.opt
    learn.export(tmp_path/'after.pkl')
    assert len(learn.dls.train) > 0 and learn.opt is not None and learn.opt is not opt
    learn2 = load_learner(tmp_path/'after.pkl')
    assert states_equal(state(learn2.model), after)
    with learn2.no_bar(): assert no_hang(lambda: learn2.predict(df.iloc[0]))[1] == learn.predict(df.iloc[0])[1]
    unchanged('export and load_learner')


def test_a_fit_after_an_interrupted_lr_find_still_saves_and_averages(tmp_path):
    "fastai resets a callback's `run` in `after_fit`, which a KeyboardInterrupt skips: the next fit must still save"
    learn = digits_learner(path=tmp_path, cbs=[SaveEvery(epochs=1), AverageLast(2)])
    stop = Stop(KeyboardInterrupt, 3)
    learn.add_cb(stop)
    with learn.no_bar(), pytest.raises(KeyboardInterrupt): learn.lr_find(num_it=10, show_plot=False)
    learn.remove_cb(stop)
    assert files(learn) == {}
    cap = Capture()
    fit(learn, 2, [cap])
    m = Manifest(folder(learn))
    assert [e['fit'] for e in m.checkpoints] == [1, 1] and len(m.data['averages']) == 1
    assert states_equal(state(learn.model), mean_of(cap.states))


# 2. Mixed precision
class Ends(Callback):
    "The model's state at the end of each fit, after every other callback"
    order = 100
    def before_fit(self): self.start = state(self.model)
    def after_fit(self): self.end = state(self.model)

@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_mixed_precision_fit_ends_normally_with_the_report_and_the_weights_asked_for(tmp_path, precision):
    learn = getattr(digits_learner(path=tmp_path), f'to_{precision}')()
    cap, avg = Capture(), AverageLast(3, end_with='better', recompute_bn=2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch: CUDA autocast asked for on a CPU
        fit(learn, 3, [SaveEvery(epochs=1), avg, cap])
        held = [float(v) for v in learn.validate()]
    assert avg.results is not None and avg.holds in ('average', 'final')
    assert list(avg.results[avg.holds].values()) == pytest.approx(held, abs=1e-6)  # the report is what the model does
    if avg.holds == 'final': assert states_equal(state(learn.model), cap.final)
    mean = mean_of(cap.states)
    for k, v in state(learn.model).items():  # weights exactly the mean; BatchNorm statistics recomputed
        if avg.holds == 'average' and 'running' not in k and 'num_batches' not in k: assert torch.equal(v, mean[k]), k
    assert isinstance(learn.cbs.filter(lambda c: isinstance(c, MixedPrecision))[0], MixedPrecision)

def test_mixed_precision_with_greedy_soup(tmp_path):
    learn = digits_learner(path=tmp_path).to_fp16()
    avg = AverageLast(3, strategy='soup')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fit(learn, 3, [SaveEvery(epochs=1), avg])
    assert avg.soup is not None and avg.results is not None

class CastInputs(Callback):
    "Feed a `.bfloat16()` model bfloat16 inputs, and hand its predictions to the loss in float32 (as MixedPrecision does)"
    order = 1
    def before_batch(self): self.learn.xb = tuple(x.bfloat16() for x in self.xb)
    def after_pred(self): self.learn.pred = self.pred.float()

def test_bfloat16_model_report_recompute_bn_and_exact_average(tmp_path):
    learn = digits_learner(path=tmp_path, cbs=CastInputs())
    learn.model.bfloat16()
    cap, avg = Capture(), AverageLast(3, recompute_bn=True, end_with='better')
    fit(learn, 3, [SaveEvery(epochs=1), avg, cap])
    assert all(v.dtype == torch.bfloat16 for v in state(learn.model).values() if v.is_floating_point())
    mean = mean_of(cap.states)
    if avg.holds == 'average':
        for k, v in state(learn.model).items():
            if 'running' not in k and 'num_batches' not in k: assert torch.equal(v, mean[k]), k
    assert list(avg.results[avg.holds].values()) == pytest.approx([float(v) for v in learn.validate()], abs=1e-6)


# 3. fine_tune
class Counts(Callback):
    "Per fit: its start and end weights, and how many validation passes ran"
    order = 100
    def __init__(self): self.starts, self.ends, self.valids = [], [], []
    def before_fit(self): self.starts.append(state(self.model)); self.valids.append(0)
    def before_validate(self): self.valids[-1] += 1
    def after_fit(self): self.ends.append(state(self.model))

@pytest.mark.parametrize('attached', [False, True])
def test_fine_tune_averages_only_the_unfrozen_stage_and_never_changes_training(tmp_path, attached):
    cbs = [SaveEvery(epochs=1), AverageLast(2)]
    learn = digits_learner(path=tmp_path, splitter=split_cnn, cbs=cbs if attached else None)
    counts, cap = Counts(), Capture()
    fit(learn, 2, [counts, cap] + ([] if attached else cbs), lr=0.05, fn='fine_tune')  # 1 frozen epoch, then 2
    assert len(counts.starts) == 2 and states_equal(counts.starts[1], counts.ends[0]), "the unfrozen stage must start where the frozen one ended"
    assert counts.valids == [1, 2 + 2]  # frozen: its epoch; unfrozen: 2 epochs + the report's two passes
    m = Manifest(folder(learn))
    assert [a['fit'] for a in m.data['averages']] == [2] and len(list(folder(learn).glob('*_avg.pth'))) == 1
    assert states_equal(state(learn.model), mean_of(cap.states[-2:]))

def test_fine_tune_frozen_true_averages_both_stages(tmp_path):
    learn = digits_learner(path=tmp_path, splitter=split_cnn)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # one checkpoint in the frozen stage, fewer than k
        fit(learn, 2, [SaveEvery(epochs=1), AverageLast(2, frozen=True)], lr=0.05, fn='fine_tune')
    assert [a['fit'] for a in Manifest(folder(learn)).data['averages']] == [1, 2]


# 4. Metric direction
@pytest.mark.parametrize('monitor', ['_rmse', 'mae'])
def test_end_with_better_knows_rmse_and_mae_are_lower_is_better(tmp_path, monitor):
    learn, _ = tabular(tmp_path, target='y')
    avg = AverageLast(3, end_with='better', monitor=monitor)
    fit(learn, 4, [SaveEvery(epochs=1), avg], lr=0.3)
    f, a = avg.results['final'][monitor], avg.results['average'][monitor]
    assert avg.holds == ('average' if a <= f else 'final')
    assert 'lower is better' in avg.reason


def test_a_metric_name_it_does_not_know_follows_fastais_rule_and_says_so(tmp_path):
    def agreement(inp, targ): return accuracy(inp, targ)
    learn = digits_learner(path=tmp_path, metrics=[accuracy, agreement])
    avg = AverageLast(2, end_with='better', monitor='agreement')
    fit(learn, 2, [SaveEvery(epochs=1), avg])
    assert avg.lower is False and "by fastai's rule for a name ckpt_avg does not know" in avg.reason and 'lower_is_better=True' in avg.reason
    assert AverageLast(2, monitor='agreement', lower_is_better=True).lower is True


# 5. Alongside fastai's callbacks
class SpoilLastEpoch(Callback):
    "Scramble the last layer at the end of the last epoch's training: SaveModelCallback's best is then an earlier epoch"
    def after_train(self):
        if self.epoch == self.n_epoch-1:
            with torch.no_grad(): self.model[-1].weight.mul_(-3.)

def test_save_model_callback_reload_is_named_in_the_report(tmp_path, capsys):
    learn = digits_learner(path=tmp_path)
    avg = AverageLast(3, end_with='final')
    fit(learn, 4, [SaveEvery(epochs=1), SaveModelCallback(fname='best'), avg, SpoilLastEpoch()], quiet=False)
    out = capsys.readouterr().out
    assert "SaveModelCallback's best" in avg.table.index[0] and 'SaveModelCallback' in avg.final_is
    assert "learn.model holds the final weights (SaveModelCallback's best, valid_loss" in out
    best = state(learn.model)
    learn.load('best')
    assert states_equal(state(learn.model), best)

def test_early_stopping_and_reduce_lr_on_plateau(tmp_path):
    learn = digits_learner(path=tmp_path)
    cap = Capture()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # fewer checkpoints than k
        fit(learn, 5, [SaveEvery(epochs=1), AverageLast(3), EarlyStoppingCallback(min_delta=10, patience=1), ReduceLROnPlateau(patience=1), cap])
    m = Manifest(folder(learn))
    assert len(m.checkpoints) == 2 and len(m.data['averages']) == 1  # stopped after the second epoch
    assert states_equal(state(learn.model), mean_of(cap.states))

def test_csv_logger_gets_the_epochs_and_the_summary_goes_to_the_screen(tmp_path, capsys):
    learn = digits_learner(path=tmp_path)
    fit(learn, 2, [SaveEvery(epochs=1), AverageLast(2), CSVLogger()], quiet=False)
    csv = (Path(learn.path)/'history.csv').read_text()
    assert len(csv.strip().splitlines()) == 3 and 'AverageLast' not in csv
    assert 'AverageLast: averaged 2 checkpoint(s)' in capsys.readouterr().out

def test_gradient_accumulation_batches_count_batches_and_steps_count_optimizer_steps(tmp_path):
    learn = digits_learner(path=tmp_path)
    n_acc = 4*learn.dls.train.bs  # one optimizer step every 4 batches
    fit(learn, 1, [GradientAccumulation(n_acc), SaveEvery(steps=2, fname='steps'), SaveEvery(batches=2, fname='batches')])
    n = len(learn.dls.train)
    assert [e['iter'] for e in Manifest(folder(learn), 'steps').checkpoints] == list(range(8, n+1, 8))
    assert [e['iter'] for e in Manifest(folder(learn), 'batches').checkpoints] == list(range(2, n+1, 2))

def test_interrupted_fits_then_another_fit_keep_the_summary(tmp_path, capsys):
    learn = digits_learner(path=tmp_path, cbs=[SaveEvery(epochs=1), AverageLast(2)])
    n = len(learn.dls.train)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(KeyboardInterrupt): learn.fit(3, 0.1, cbs=Stop(KeyboardInterrupt, n+3))  # with the progress bar
        learn.fit(3, 0.1, cbs=Stop(CancelFitException(), n+3))  # ends the fit; AverageLast averages what there is
    capsys.readouterr()
    cap = Capture()
    learn.fit(2, 0.1, cbs=cap)
    out = capsys.readouterr().out
    assert 'AverageLast: averaged 2 checkpoint(s) of fit 3' in out
    assert states_equal(state(learn.model), mean_of(cap.states))
    assert [a['fit'] for a in Manifest(folder(learn)).data['averages']] == [2, 3]

def test_no_logging_silences_the_table_and_the_summary(tmp_path, capsys):
    learn = digits_learner(path=tmp_path)
    with learn.no_logging(): learn.fit(2, 0.1, cbs=[SaveEvery(epochs=1), AverageLast(2)])
    out = capsys.readouterr().out
    assert 'final weights' not in out and 'AverageLast' not in out


# 6. Errors known before training
@pytest.mark.parametrize('strategy', ['best', 'metric', 'window'])
@pytest.mark.parametrize('trigger', [dict(batches=5), dict(minutes=1)])
def test_metric_strategies_with_mid_epoch_saves_only_are_refused_before_training(tmp_path, strategy, trigger):
    learn = digits_learner(path=tmp_path)
    w0 = state(learn.model)
    with pytest.raises(ValueError, match=f"strategy='{strategy}' .* saves only in the middle of epochs.*add epochs="):
        fit(learn, 2, [SaveEvery(**trigger), AverageLast(2, strategy=strategy)])
    assert states_equal(state(learn.model), w0) and files(learn) == {}


# 8. What a user sees
def test_minutes_longer_than_the_fit_says_why_nothing_was_saved(tmp_path):
    learn = digits_learner(path=tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        fit(learn, 1, [SaveEvery(minutes=10), AverageLast(5)])
    ours = [str(x.message) for x in w if 'SaveEvery' in str(x.message) or 'AverageLast' in str(x.message)]
    assert len(ours) == 1, ours
    assert 'minutes=10 saves once 10 minutes have passed and this fit took' in ours[0] and 'SaveEvery(epochs=1)' in ours[0]

def test_epoch_spans_are_rounded_and_grouped_by_fit(tmp_path, capsys):
    learn = digits_learner(path=tmp_path)
    n = len(learn.dls.train)
    fit(learn, 2, [SaveEvery(batches=7)], quiet=True)
    fit(learn, 2, [SaveEvery(batches=7), AverageLast(5, scope='all', report=False)], quiet=False)
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith('AverageLast')][0]
    assert not re.search(r'\d\.\d{3}', line), line
    assert 'fit 1: epochs 1.75, iterations 28; fit 2: epochs 0.44–1.75, iterations 7–28' in line, line

def test_plot_shows_mid_epoch_saves(tmp_path):
    import matplotlib; matplotlib.use('Agg')
    learn = digits_learner(path=tmp_path)
    avg = AverageLast(3)
    fit(learn, 2, [SaveEvery(batches=5), avg])
    ax = avg.plot()
    assert len(ax.lines[0].get_xdata()) == len(avg.pool) and 'train loss' in ax.get_ylabel()
    ax = avg.plot(validate=True)
    ys = list(ax.lines[0].get_ydata())
    assert len(ys) == len(avg.pool)
    learn.load(Path(avg.pool[0]['file']).stem)
    assert ys[0] == pytest.approx(float(learn.validate()[0]), abs=1e-6)
