"SaveEvery's writing path: snapshot into reused buffers, background writer, CRC32 off, errors surfaced on the training thread"
import threading, time, warnings, zipfile
from pathlib import Path
import pytest, torch
from fastai.callback.core import Callback
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
from ckpt_avg.manifest import Manifest, file_hash
from ckpt_avg.demo import digits_learner
from helpers import fit, state, states_equal, mean_of, folder


def no_temps(learn): return not list(folder(learn).glob('.*.tmp'))

class Recording(SaveEvery):
    "Records, on the training thread, the model state at each save, and the snapshot buffers' addresses"
    def before_fit(self):
        super().before_fit(); self.states, self.ptrs, self.threads = [], [], set()
    def _take(self, trigger):
        self.states.append(state(self.model))
        super()._take(trigger)
        if self.in_background: self.ptrs.append({k: v.data_ptr() for k, v in self._snapshot.buffers.items()})
    def _write_model(self, f):
        self.threads.add(threading.current_thread().name)
        super()._write_model(f)

class SlowWriter(Recording):
    "Each write waits until training has gone `ahead` batches past its save (the last one: until the fit ends)"
    def __init__(self, *args, ahead=3, **kw): super().__init__(*args, **kw); self.ahead = ahead
    def before_fit(self): super().before_fit(); self.saw_training, self.go = [], threading.Event()
    def _take(self, trigger): self.go.clear(); super()._take(trigger)
    def after_batch(self):
        super().after_batch()
        if self.training and self.last_iter is not None and self.train_iter >= self.last_iter + self.ahead: self.go.set()
    def after_fit(self): self.go.set(); super().after_fit()
    def _write_model(self, f):
        self.saw_training.append(self.go.wait(timeout=20) and self.train_iter >= self.last_iter + self.ahead)
        super()._write_model(f)


def test_background_files_hold_the_state_at_each_save_and_training_ran_during_the_write(tmp_path):
    learn = digits_learner(path=tmp_path)
    n = len(learn.dls.train)
    saver = SlowWriter(batches=n//3, background=True, ahead=2)
    fit(learn, 2, [saver])
    m = Manifest(folder(learn))
    assert len(m.checkpoints) == len(saver.states) >= 5
    assert saver.saw_training[:-1] and all(saver.saw_training[:-1]), saver.saw_training  # (the last may end the fit)
    assert saver.threads == {'ckpt_avg-writer'}
    for e, s in zip(m.checkpoints, saver.states):
        assert states_equal(torch.load(m.file(e)), s), e['file']
        assert e['hash'] == file_hash(m.file(e)) and e['bytes'] == m.file(e).stat().st_size
    assert no_temps(learn)


def test_background_snapshot_buffers_are_reused_from_save_to_save(tmp_path):
    learn = digits_learner(path=tmp_path)
    saver = Recording(epochs=1, background=True)
    fit(learn, 3, [saver])
    assert len(saver.ptrs) == 3 and saver.ptrs[0] == saver.ptrs[1] == saver.ptrs[2]
    assert saver._snapshot.buffers == {}  # and released when the fit ends


def test_files_are_written_without_crc32_and_the_global_option_is_restored(tmp_path):
    for background in (False, True):
        learn = digits_learner(path=tmp_path/str(background))
        fit(learn, 1, [SaveEvery(epochs=1, with_opt=True, background=background)])
        f = folder(learn)/'ckpt_f001_s0001.pth'
        assert all(i.CRC == 0 for i in zipfile.ZipFile(f).infolist())
        assert torch.serialization.get_crc32_options() is True
        learn.load('ckpt_f001_s0001', with_opt=True)  # fastai loads it, optimizer state included


def test_after_fit_waits_for_the_last_write_before_averaging(tmp_path):
    class SlowDisk(Recording):
        def _write_model(self, f): time.sleep(0.5); super()._write_model(f)
    learn = digits_learner(path=tmp_path)
    saver = SlowDisk(epochs=1, background=True)
    fit(learn, 3, [saver, AverageLast(3)])
    assert states_equal(state(learn.model), mean_of(saver.states))
    m = Manifest(folder(learn))
    assert m.data['averages'][-1]['inputs'] == [e['file'] for e in m.checkpoints] and len(m.checkpoints) == 3


def test_metrics_reach_a_save_still_in_flight_at_the_epoch_end(tmp_path):
    learn = digits_learner(path=tmp_path)
    n = len(learn.dls.train)
    saver = SlowWriter(batches=n, background=True, ahead=1)  # the write waits into the next epoch
    fit(learn, 3, [saver])
    m = Manifest(folder(learn))
    assert [e['iter'] for e in m.checkpoints] == [n, 2*n, 3*n]
    assert all('valid_loss' in e['metrics'] and 'accuracy' in e['metrics'] for e in m.checkpoints), m.checkpoints


class DiskFillsUp(Recording):
    "Save number `bad` runs out of space half way through writing"
    def __init__(self, *args, bad=3, **kw): super().__init__(*args, **kw); self.bad, self.calls = bad, 0
    def _write_model(self, f):
        self.calls += 1
        if self.calls == self.bad: f.write(b'partial bytes'); raise OSError(28, 'No space left on device')
        super()._write_model(f)

def test_background_error_warns_at_the_next_save_and_leaves_nothing_half_written(tmp_path):
    learn = digits_learner(path=tmp_path)
    saver = DiskFillsUp(epochs=1, background=True)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always'); fit(learn, 4, [saver])
    assert any('No space left on device' in str(w.message) and 'training goes on' in str(w.message) for w in ws)
    assert [e['epoch'] for e in saver.saved] == [1.0, 2.0, 4.0]
    assert sorted(p.name for p in folder(learn).iterdir()) == \
        ['ckpt_f001_s0001.pth', 'ckpt_f001_s0002.pth', 'ckpt_f001_s0003.pth', 'ckpt_manifest.json']
    m = Manifest(folder(learn))
    for e, s in zip(m.checkpoints, [saver.states[i] for i in (0, 1, 3)]):
        assert states_equal(torch.load(m.file(e)), s) and e['hash'] == file_hash(m.file(e))
    assert torch.serialization.get_crc32_options() is True


@pytest.mark.parametrize('bad', [2, 3])  # 2: raised at the next save; 3: the last save, raised by after_fit
def test_background_error_with_stop_on_error_stops_the_fit(tmp_path, bad):
    learn = digits_learner(path=tmp_path)
    saver = DiskFillsUp(epochs=1, background=True, stop_on_error=True, bad=bad)
    with pytest.raises(OSError, match='No space left'): fit(learn, 3, [saver, AverageLast(3)])
    assert len(saver.states) == bad  # the save after the failed one raised before taking its state
    assert [e['file'] for e in Manifest(folder(learn)).checkpoints] == [f'ckpt_f001_s{i:04d}.pth' for i in range(1, bad)]
    assert no_temps(learn) and not list(folder(learn).glob('*_avg.pth'))


def test_the_default_writes_in_the_background_and_synchronous_can_be_asked_for(tmp_path):
    learn = digits_learner(path=tmp_path)
    bg, sync = Recording(epochs=1, fname='a'), Recording(epochs=1, fname='b', background=False)
    fit(learn, 1, [bg, sync])
    assert bg.in_background is True and bg.threads == {'ckpt_avg-writer'}
    assert sync.in_background is False and sync.threads == {threading.main_thread().name}
    for bad in ('yes', None):
        with pytest.raises(ValueError, match=f"background={bad!r}: pass True"): SaveEvery(epochs=1, background=bad)


def test_every_file_is_synced_before_it_gets_its_name_and_its_folder_after(tmp_path, monkeypatch):
    "Durability: a checkpoint, the average and the manifest are on the disk (not only in the page cache) when recorded"
    import os
    events, real_fsync, real_link, real_replace = [], os.fsync, os.link, os.replace
    def fsync(fd):
        events.append(('fsync', 'folder' if os.path.isdir(f'/proc/self/fd/{fd}') else os.path.basename(os.readlink(f'/proc/self/fd/{fd}'))))
        real_fsync(fd)
    def named(kind, real):
        def f(src, dst, *a, **kw): events.append((kind, Path(src).name, Path(dst).name)); return real(src, dst, *a, **kw)
        return f
    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'link', named('link', real_link))
    monkeypatch.setattr(os, 'replace', named('replace', real_replace))
    learn = digits_learner(path=tmp_path)
    fit(learn, 2, [SaveEvery(epochs=1), AverageLast(2, report=False)])
    for name in ['ckpt_f001_s0001.pth', 'ckpt_f001_s0002.pth', 'ckpt_f001_avg.pth', 'ckpt_manifest.json']:
        i = next(i for i, e in enumerate(events) if e[0] in ('link', 'replace') and e[2] == name)
        tmp = events[i][1]
        assert ('fsync', tmp) in events[:i], f"{name} got its name before its bytes were synced"
        assert events[i+1] == ('fsync', 'folder'), f"{name}'s new name was not synced: {events[i+1]}"
    assert [e[2] for e in events if e[0] == 'link'] == ['ckpt_f001_s0001.pth', 'ckpt_f001_s0002.pth', 'ckpt_f001_avg.pth']  # never replacing
