"Real fastai training on digits with SaveEvery and AverageLast: triggers, files, manifest, averaging, errors"
import time, warnings
from pathlib import Path
import pytest, torch
from fastai.callback.core import Callback
import fastai.callback.schedule  # patches Learner.fine_tune and fit_one_cycle
from fastai.layers import ConvLayer
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
from ckpt_avg.core import average_checkpoints, CheckpointError
from ckpt_avg.manifest import Manifest, IntegrityError, file_hash
from ckpt_avg.demo import digits_learner
from helpers import Capture, fit, state, states_equal, mean_of, folder


def make_learner(path, **kw):
    learn = digits_learner(path=path, **kw)
    return learn


class SlowBatches(Callback):
    "Make every training batch take at least `secs` of wall time (real time, no mocked clock)"
    def __init__(self, secs): self.secs = secs
    def after_batch(self):
        if self.training: time.sleep(self.secs)


def test_average_equals_mean_of_last_k_saved_states(tmp_path):
    learn = make_learner(tmp_path)
    cap = Capture()
    fit(learn, 6, [SaveEvery(epochs=1), AverageLast(4), cap])
    assert len(cap.states) == 6
    assert states_equal(state(learn.model), mean_of(cap.states[-4:]))
    # and the saved average is the same state, loadable with learn.load
    avg = torch.load(folder(learn)/'ckpt_f001_avg.pth')
    assert states_equal(avg, mean_of(cap.states[-4:]))


def test_each_checkpoint_file_holds_the_captured_state(tmp_path):
    learn = make_learner(tmp_path)
    cap = Capture()
    fit(learn, 3, [SaveEvery(epochs=1), cap])
    m = Manifest(folder(learn))
    assert [e['file'] for e in m.checkpoints] == ['ckpt_f001_s0001.pth', 'ckpt_f001_s0002.pth', 'ckpt_f001_s0003.pth']
    for e, s in zip(m.checkpoints, cap.states):
        assert states_equal(torch.load(m.file(e)), s)
        assert e['hash'] == file_hash(m.file(e)) and e['bytes'] == m.file(e).stat().st_size


def test_minutes_saves_mid_epoch_when_batches_are_slow(tmp_path):
    learn = make_learner(tmp_path)
    interval = 0.3
    fit(learn, 2, [SlowBatches(0.05), SaveEvery(minutes=interval/60)])
    m = Manifest(folder(learn))
    epochs = [e['epoch'] for e in m.checkpoints]
    assert len(epochs) >= 3, epochs
    assert any(ep != int(ep) for ep in epochs), f"no mid-epoch save: {epochs}"
    assert all(e['trigger'] == 'minutes' and e['metrics'] == {} or e['epoch'] == int(e['epoch']) for e in m.checkpoints)
    # the manifest's own clock: `seconds` is read when a save is taken, after its trigger fired, so two saves are at least
    # `interval` apart (less the 1 ms of its rounding); a clock read by another callback would add that callback's own delays
    seconds = [e['seconds'] for e in m.checkpoints]
    gaps = [b - a for a, b in zip(seconds, seconds[1:])]
    assert min(gaps) >= interval - 1e-3, gaps


def test_minutes_interval_does_not_count_the_time_spent_saving(tmp_path):
    "With a save slower than the interval, the next save still waits a full interval after the previous one ended"
    class SlowSave(SaveEvery):
        def before_fit(self): super().before_fit(); self.starts, self.ends = [], []
        def _take(self, trigger):
            self.starts.append(time.monotonic()); time.sleep(0.5)
            super()._take(trigger); self.ends.append(time.monotonic())
    learn = make_learner(tmp_path)
    saver = SlowSave(minutes=0.3/60)
    fit(learn, 1, [SlowBatches(0.05), saver])
    assert len(saver.starts) >= 2
    waits = [s - e for e, s in zip(saver.ends, saver.starts[1:])]
    assert min(waits) >= 0.3, waits  # had the 0.5 s save counted, the next batch (0.05 s) would have saved at once


def test_batches_and_epochs_fire_at_documented_iterations_and_never_twice(tmp_path):
    learn = make_learner(tmp_path)
    n = len(learn.dls.train)
    B = n // 2 + 1  # not a divisor of n: batch saves drift across epoch ends
    cap = Capture()
    fit(learn, 4, [SaveEvery(epochs=2, batches=B), cap])
    m = Manifest(folder(learn))
    iters = [e['iter'] for e in m.checkpoints]
    expected = sorted(set(range(B, 4*n+1, B)) | {2*n, 4*n})
    assert iters == expected
    assert len(set(iters)) == len(iters) and cap.iters == iters
    for e in m.checkpoints:
        if e['iter'] in (2*n, 4*n): assert e['epoch'] in (2.0, 4.0) and 'valid_loss' in e['metrics']
        else: assert e['trigger'] == 'batches'


def test_batch_save_on_the_epoch_end_gets_the_epoch_metrics_and_no_second_save(tmp_path):
    learn = make_learner(tmp_path)
    n = len(learn.dls.train)
    fit(learn, 2, [SaveEvery(epochs=1, batches=n)])
    m = Manifest(folder(learn))
    assert [e['iter'] for e in m.checkpoints] == [n, 2*n]
    assert [e['epoch'] for e in m.checkpoints] == [1.0, 2.0]
    assert all('valid_loss' in e['metrics'] for e in m.checkpoints)


def test_epochs_trigger_is_one_based(tmp_path):
    learn = make_learner(tmp_path)
    fit(learn, 5, [SaveEvery(epochs=2)])
    assert [e['epoch'] for e in Manifest(folder(learn)).checkpoints] == [2.0, 4.0]


def test_fine_tune_default_scope_averages_only_the_second_fit(tmp_path):
    learn = make_learner(tmp_path)
    cap = Capture()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        fit(learn, 3, [SaveEvery(epochs=1), AverageLast(5), cap], lr=0.01, fn='fine_tune')
    m = Manifest(folder(learn))
    assert [e['fit'] for e in m.checkpoints] == [1, 2, 2, 2]
    second = m.data['averages'][-1]
    assert second['fit'] == 2 and second['inputs'] == [e['file'] for e in m.checkpoints if e['fit'] == 2]
    assert states_equal(state(learn.model), mean_of(cap.states[-3:]))


def test_scope_all_spans_fits(tmp_path):
    learn = make_learner(tmp_path)
    cap = Capture()
    fit(learn, 2, [SaveEvery(epochs=1), cap])
    first = cap.states
    cap2 = Capture()
    fit(learn, 2, [SaveEvery(epochs=1), AverageLast(3, scope='all'), cap2])
    assert states_equal(state(learn.model), mean_of(first[-1:] + cap2.states))


def test_keep_rotates_and_a_second_fit_leaves_the_first_fits_files_intact(tmp_path):
    learn = make_learner(tmp_path)
    fit(learn, 5, [SaveEvery(epochs=1, keep=3), AverageLast(3)])
    m = Manifest(folder(learn))
    on_disk = sorted(p.name for p in folder(learn).glob('ckpt_f001_s*.pth'))
    assert on_disk == ['ckpt_f001_s0003.pth', 'ckpt_f001_s0004.pth', 'ckpt_f001_s0005.pth']
    assert [bool(e.get('removed')) for e in m.checkpoints] == [True, True, False, False, False]
    before = {p.name: file_hash(p) for p in folder(learn).iterdir()}
    fit(learn, 2, [SaveEvery(epochs=1), AverageLast(2)])
    for name, h in before.items():
        if name != 'ckpt_manifest.json': assert file_hash(folder(learn)/name) == h, name
    m = Manifest(folder(learn))
    assert [e['file'] for e in m.live(2)] == ['ckpt_f002_s0001.pth', 'ckpt_f002_s0002.pth']
    assert (folder(learn)/'ckpt_f002_avg.pth').exists() and (folder(learn)/'ckpt_f001_avg.pth').exists()


def test_keep_never_deletes_files_the_manifest_does_not_list(tmp_path):
    learn = make_learner(tmp_path)
    f = folder(learn); f.mkdir(parents=True)
    mine = f/'ckpt_mine.pth'; mine.write_bytes(b'user file')
    fit(learn, 4, [SaveEvery(epochs=1, keep=1)])
    assert mine.read_bytes() == b'user file'
    assert sorted(p.name for p in f.glob('ckpt_f*.pth')) == ['ckpt_f001_s0004.pth']


def test_every_file_loads_with_learn_load_with_and_without_opt(tmp_path):
    learn = make_learner(tmp_path)
    cap = Capture()
    fit(learn, 3, [SaveEvery(epochs=1, with_opt=True, fname='ckpt'), AverageLast(3), cap])
    m = Manifest(folder(learn))
    assert all(e['with_opt'] for e in m.checkpoints)
    for e, s in zip(m.checkpoints, cap.states):
        name = e['file'][:-len('.pth')]
        with warnings.catch_warnings():
            warnings.simplefilter('error', UserWarning)  # fastai warns when a file has no optimizer state
            learn.load(name, with_opt=True)
        assert states_equal(state(learn.model), s)
        assert len(learn.opt.state) > 0
        learn.load(name, with_opt=False)
        assert states_equal(state(learn.model), s)
    learn.load('ckpt_f001_avg', with_opt=False)
    assert states_equal(state(learn.model), mean_of(cap.states))
    # files without optimizer state load too
    learn2 = make_learner(tmp_path/'b')
    fit(learn2, 1, [SaveEvery(epochs=1)])
    learn2.load('ckpt_f001_s0001')


def test_fewer_saves_than_k_warns_and_averages_those(tmp_path):
    learn = make_learner(tmp_path)
    cap = Capture()
    with pytest.warns(UserWarning, match=r'only 2 checkpoint\(s\) of fit 1 to average, fewer than k=5'):
        fit(learn, 2, [SaveEvery(epochs=1), AverageLast(5), cap])
    assert states_equal(state(learn.model), mean_of(cap.states))


def test_no_saves_warns_and_leaves_the_model(tmp_path):
    learn = make_learner(tmp_path)
    class Final(Callback):
        order = 0
        def after_fit(self): self.state = state(self.model)
    final = Final()
    with pytest.warns(UserWarning, match='no checkpoints of fit 1'):
        fit(learn, 1, [SaveEvery(epochs=5), AverageLast(3), final])
    assert states_equal(state(learn.model), final.state)
    assert not (folder(learn)/'ckpt_f001_avg.pth').exists()


def test_bf16_model_average_is_exact_and_keeps_dtypes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(50, 50), torch.nn.BatchNorm1d(50)).to(torch.bfloat16)
    files, states = [], []
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters(): p.add_(torch.randn_like(p)*0.1)
        model.train(); model(torch.randn(8, 50, dtype=torch.bfloat16))
        states.append(state(model)); files.append(tmp_path/f'{i}.pth'); torch.save(model.state_dict(), files[-1])
    avg = average_checkpoints(files)
    for k, v in avg.items():
        assert v.dtype == states[-1][k].dtype
        assert torch.equal(v, mean_of(states)[k]), k
    assert avg['1.num_batches_tracked'].item() == 5


# ---------------------------------------------------------------- bad input: a clear error before anything changes
@pytest.mark.parametrize('make, msg', [
    (lambda: SaveEvery(), 'needs a trigger'),
    (lambda: SaveEvery(epochs=0), 'epochs=0'),
    (lambda: SaveEvery(batches=-3), 'batches=-3'),
    (lambda: SaveEvery(minutes=0), 'minutes=0'),
    (lambda: SaveEvery(minutes=-1.5), 'minutes=-1.5'),
    (lambda: SaveEvery(epochs=1.5), 'epochs=1.5'),
    (lambda: SaveEvery(epochs='2'), "epochs='2'"),
    (lambda: SaveEvery(epochs=1, keep=0), 'keep=0'),
    (lambda: SaveEvery(epochs=1, fname='a/b'), 'plain file name'),
    (lambda: AverageLast(0), 'k=0'),
    (lambda: AverageLast(-2), 'k=-2'),
    (lambda: AverageLast(2.5), 'k=2.5'),
    (lambda: AverageLast(3, scope='everything'), "scope='everything'"),
    (lambda: AverageLast(3, save_as='../x'), 'save_as'),
])
def test_bad_arguments_are_refused_at_construction(make, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace('.', r'\.')): make()


def _refused_before_training(tmp_path, cbs, exc, msg):
    learn = make_learner(tmp_path)
    before = state(learn.model)
    f = folder(learn)
    listing = sorted(p.name for p in f.iterdir()) if f.exists() else None
    with pytest.raises(exc, match=msg): fit(learn, 2, cbs)
    assert states_equal(state(learn.model), before)
    assert (sorted(p.name for p in f.iterdir()) if f.exists() else None) == listing
    return learn


def test_keep_smaller_than_k_is_refused_before_training(tmp_path):
    _refused_before_training(tmp_path, [SaveEvery(epochs=1, keep=2), AverageLast(5)], ValueError,
                             r'keep=2 would delete checkpoints that AverageLast\(5\) needs; pass keep>=5')


def test_average_without_a_saver_is_refused_before_training(tmp_path):
    _refused_before_training(tmp_path, [AverageLast(3)], ValueError, "no SaveEvery")
    _refused_before_training(tmp_path, [AverageLast(3, scope='all')], ValueError, 'nothing to average')
    _refused_before_training(tmp_path, [SaveEvery(epochs=1, fname='other'), AverageLast(3)], ValueError, "no SaveEvery\\(fname='ckpt'\\)")


def test_existing_average_file_is_not_overwritten(tmp_path):
    learn = make_learner(tmp_path)
    f = folder(learn); f.mkdir(parents=True)
    (f/'mine.pth').write_bytes(b'precious')
    _refused_before_training(tmp_path, [SaveEvery(epochs=1), AverageLast(2, save_as='mine')], FileExistsError, 'overwrite=True')
    assert (f/'mine.pth').read_bytes() == b'precious'


def test_mismatched_checkpoints_raise_and_leave_the_model_and_folder(tmp_path):
    "A manifest mixing two models (same folder, same fname): averaging across fits names the key and files"
    learn = make_learner(tmp_path)
    fit(learn, 1, [SaveEvery(epochs=1)])
    learn2 = make_learner(tmp_path)
    learn2.model = torch.nn.Sequential(ConvLayer(1, 8), ConvLayer(8, 32, stride=2), *list(learn.model)[2:])  # narrower first layer
    class Final(Callback):
        order = 0
        def after_fit(self): self.state = state(self.model)
    final = Final()
    with pytest.raises(CheckpointError, match=r"key '0.0.weight' is .* in .*ckpt_f001_s0001.pth but .* in .*ckpt_f002_s0001.pth"):
        fit(learn2, 1, [SaveEvery(epochs=1), AverageLast(2, scope='all'), final])
    assert states_equal(state(learn2.model), final.state)
    assert not list(folder(learn).glob('*_avg.pth'))


def test_unreadable_and_non_checkpoint_files_are_named(tmp_path):
    learn = make_learner(tmp_path)
    fit(learn, 3, [SaveEvery(epochs=1)])
    m = Manifest(folder(learn))
    victim = m.file(m.checkpoints[1])
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    with pytest.raises(IntegrityError, match='ckpt_f001_s0002.pth has 1,000 bytes but the manifest recorded'):
        average_checkpoints([m.file(e) for e in m.checkpoints])  # a list: checked against its files' manifest too (test_plan.py)
    loose = tmp_path/'loose.pth'  # the same bytes in no manifest: read as they are, and named by the reader
    loose.write_bytes(victim.read_bytes())
    with pytest.raises(CheckpointError, match='loose.pth looks like a torch file but cannot be read'):
        average_checkpoints([m.file(m.checkpoints[0]), loose])
    (tmp_path/'notes.txt').write_text('hello')
    with pytest.raises(CheckpointError, match='notes.txt is not a checkpoint'):
        average_checkpoints([m.file(m.checkpoints[0]), tmp_path/'notes.txt'])
    with pytest.raises(CheckpointError, match='does not exist'):
        average_checkpoints(tmp_path/'missing_folder')


def test_average_checkpoints_on_a_folder_uses_the_manifest_not_names_or_times(tmp_path):
    learn = make_learner(tmp_path)
    cap = Capture()
    fit(learn, 4, [SaveEvery(epochs=1), cap])
    f = folder(learn)
    # a stray file that sorts last and is newest must not be picked up
    torch.save(state(learn.model), f/'ckpt_f999_s9999.pth')
    avg = average_checkpoints(f, k=2)
    assert states_equal(avg, mean_of(cap.states[-2:]))


def test_two_savers_with_one_fname_are_refused_before_training(tmp_path):
    _refused_before_training(tmp_path, [SaveEvery(epochs=1), SaveEvery(batches=3)], ValueError, "two SaveEvery callbacks with fname='ckpt'")
