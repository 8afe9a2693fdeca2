"""Several writers in one folder: processes that train into one `models` folder with one `fname` at once lose nothing.

Each trainer is a process, forked after the imports from one subprocess (`ZYGOTE`, so that four trainers cost one
import of fastai), that trains digits with `SaveEvery(batches=2)` (even seeds in the background, odd ones in line),
records every warning and the entries it saved. Trainers start together (they wait at a barrier file) or a second
apart. Afterwards the manifest must list every save of every trainer, each file must verify against its entry and
hold the bytes its trainer wrote (no file replaced), fit ids must differ, and no trainer may have warned.
Also here: an average recorded (as the command line does) while a fit trains stays recorded; a temporary that a live
writer of another machine holds is not cleaned; rotation deletes only this fit's saves by default and never a name
the library did not give; a record that cannot be written takes its file with it.
"""
import errno, json, os, signal, subprocess, sys, time, warnings
from pathlib import Path
import pytest, torch
from ckpt_avg.files import atomic_write, clean_stale_temps, file_hash, _machine
from ckpt_avg.manifest import Manifest, checkpoint_name
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
from ckpt_avg.demo import digits_learner
from helpers import fit, folder

ROOT = Path(__file__).resolve().parents[1]

ZYGOTE = r'''
import json, os, sys, time, traceback, warnings
import torch; torch.set_num_threads(1)
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
from ckpt_avg.demo import digits_learner

def train(path, seed, epochs, go, average):
    learn = digits_learner(path=path, seed=seed)
    saver = SaveEvery(batches=2, background=seed % 2 == 0)  # half the trainers write in the background, half in line
    avg = AverageLast(3, report=False)
    while go and not os.path.exists(go): time.sleep(0.001)   # the barrier: all start training together
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 0.1, cbs=[saver] + [avg]*average)
    mine = [str(w.message) for w in ws if issubclass(w.category, UserWarning) and ('ckpt_avg' in (w.filename or '') or 'SaveEvery' in str(w.message))]
    return dict(fit=saver.fit_id, saved=[{k: e[k] for k in ('file', 'hash', 'bytes', 'fit')} for e in saver.saved], warnings=mine,
                average=[str(avg.saved_path), [f.name for f in avg.files]] if average else None)

# one import of torch and fastai, then one forked trainer per seed: together (after a barrier) or `apart` seconds apart
path, n, epochs, apart, average = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == '1'
go = None if apart else os.path.join(path, 'go')
pids = []
for seed in range(n):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            r = train(path, seed, epochs, go, average)
            with open(os.path.join(path, f'result{seed}.json'), 'w') as f: json.dump(r, f)
            code = 0
        except BaseException: traceback.print_exc()
        finally: sys.stderr.flush(); os._exit(code)
    pids.append(pid)
    if apart: time.sleep(apart)
if go: time.sleep(0.5); open(go, 'w').close()
codes = [os.waitpid(p, 0)[1] for p in pids]
print(json.dumps(codes))
'''

def trainers(path, n, epochs, apart=0, average=False):
    "Train `n` processes into `path`'s `models`, together or `apart` seconds apart (with an AverageLast if `average`); their results"
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, '-c', ZYGOTE, str(path), str(n), str(epochs), str(apart), '1' if average else '0'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1]) == [0]*n, r.stderr[-3000:]
    return [json.loads((Path(path)/f'result{i}.json').read_text()) for i in range(n)]

TRAINER = r'''
import json, sys, warnings
import torch; torch.set_num_threads(1)
from ckpt_avg.save import SaveEvery
from ckpt_avg.demo import digits_learner
learn = digits_learner(path=sys.argv[1], seed=1)
saver = SaveEvery(batches=2)
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter('always')
    with learn.no_bar(), learn.no_logging(): learn.fit(int(sys.argv[2]), 0.1, cbs=[saver])
print(json.dumps(dict(saved=[e['file'] for e in saver.saved], warnings=[str(w.message) for w in ws if 'SaveEvery' in str(w.message)])))
'''

def check_folder(models, results):
    "Every save of every trainer listed once, whole, with the bytes its trainer wrote; distinct fits; no warning; no debris"
    m = Manifest(models)
    listed = {e['file']: e for e in m.checkpoints}
    assert len(listed) == len(m.checkpoints), "a file name listed twice"
    for r in results:
        assert r['warnings'] == [], r['warnings']
        assert r['saved'] and {e['fit'] for e in r['saved']} == {r['fit']}
        for e in r['saved']:
            assert e['file'] in listed, f"{e['file']} was saved but the manifest lost it"
            assert listed[e['file']]['hash'] == e['hash'] == file_hash(models/e['file']), f"{e['file']} was replaced"
    fits = [r['fit'] for r in results]
    assert len(set(fits)) == len(fits), f"two trainers got one fit id: {fits}"
    assert sorted(f['fit'] for f in m.fits) == sorted(fits)
    assert len(m.checkpoints) == sum(len(r['saved']) for r in results)
    m.verify(m.checkpoints)
    assert [p.name for p in models.iterdir() if p.name.startswith('.')] == [], "temporaries or lock files left"
    return m


@pytest.mark.parametrize('n', [2, 4])
def test_trainers_started_together_lose_nothing(tmp_path, n):
    results = trainers(tmp_path, n, 2)
    m = check_folder(tmp_path/'models', results)
    print(f"\n{n} trainers at once: {len(m.checkpoints)} saves, fits {sorted(r['fit'] for r in results)}")


def test_trainers_with_averages_at_once_each_average_their_own_fit(tmp_path):
    results = trainers(tmp_path, 2, 2, average=True)
    m = check_folder(tmp_path/'models', results)
    for r in results:
        path, inputs = r['average']
        assert Path(path).name == f"ckpt_f{r['fit']:03d}_avg.pth" and inputs == [e['file'] for e in r['saved'][-3:]]
    assert sorted(a['file'] for a in m.averages) == sorted(f"ckpt_f{r['fit']:03d}_avg.pth" for r in results)


def test_trainers_started_seconds_apart_lose_nothing(tmp_path):
    results = trainers(tmp_path, 3, 2, apart=1.0)
    check_folder(tmp_path/'models', results)


def test_an_average_recorded_while_a_fit_trains_stays_recorded(tmp_path):
    models = tmp_path/'models'
    learn = digits_learner(path=tmp_path)
    fit(learn, 2, [SaveEvery(epochs=1)])  # fit 1: what the command line averages
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, '-c', TRAINER, str(tmp_path), '6'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # fit 2 trains in that process, recording a save every 2 batches
    m = Manifest(models)
    deadline = time.time() + 120
    while not m.reload().live(2) and time.time() < deadline: time.sleep(0.05)
    assert m.live(2), "the trainer never saved"
    from ckpt_avg.cli import main
    avg = models/'cli_avg.pth'  # the command line averages fit 1 into the folder while fit 2 trains
    assert main(['average', str(models), '--fit', '1', '-q', '-o', str(avg)]) == 0
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    r = json.loads(out.strip().splitlines()[-1])
    assert r['warnings'] == [] and len(r['saved']) > 10
    m = Manifest(models)
    assert [a['file'] for a in m.averages] == ['cli_avg.pth'], "the trainer's manifest writes dropped the average"
    assert set(r['saved']) <= {e['file'] for e in m.checkpoints}


HOLDER = r'''
import fcntl, sys, time
f = open(sys.argv[1], 'ab'); fcntl.flock(f, fcntl.LOCK_EX)
print('held', flush=True); sys.stdin.readline()
'''

@pytest.mark.parametrize('name', ['.ckpt_f001_s0001.pth.{other}-{pid}-0a0b0c0d.tmp',  # another machine's writer
                                  '.ckpt_f001_s0001.pth.{pid}.tmp'])                   # a pid from another pid namespace
def test_a_temporary_a_live_writer_holds_is_not_cleaned(tmp_path, name):
    "The writer lives where our pid numbers mean nothing: its pid is not alive here, but it holds its temporary's lock"
    dead_here = 4_000_000  # above pid_max: no process of ours has it
    tmp = tmp_path/name.format(other='feedc0de' if _machine() != 'feedc0de' else 'c0ffee00', pid=dead_here)
    tmp.write_bytes(b'half a checkpoint')
    h = subprocess.Popen([sys.executable, '-c', HOLDER, str(tmp)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert h.stdout.readline().strip() == 'held'
        assert clean_stale_temps(tmp_path) == [] and tmp.exists()
    finally: h.communicate('\n', timeout=30)
    if '-' in tmp.name:  # another machine's: its locks might not reach us, so it also has to be an hour old
        assert clean_stale_temps(tmp_path) == [] and tmp.exists()
        os.utime(tmp, (time.time() - 7200,)*2)
    assert clean_stale_temps(tmp_path) == [tmp] and not tmp.exists()


def test_keep_rotates_only_this_fits_saves_by_default(tmp_path):
    first, second = digits_learner(path=tmp_path), digits_learner(path=tmp_path, seed=1)  # two notebooks, one `models`
    fit(first, 3, [SaveEvery(epochs=1)])
    kept = {p.name: file_hash(p) for p in folder(first).glob('ckpt_f001_*.pth')}
    fit(second, 4, [SaveEvery(epochs=1, keep=2), AverageLast(2)])
    assert {p.name: file_hash(p) for p in folder(first).glob('ckpt_f001_*.pth')} == kept
    m = Manifest(folder(first))
    assert [e['file'] for e in m.live()] == [f'ckpt_f001_s000{i}.pth' for i in (1, 2, 3)] + ['ckpt_f002_s0003.pth', 'ckpt_f002_s0004.pth']
    fit(second, 2, [SaveEvery(epochs=1, keep=2, keep_scope='all')])  # the explicit switch: across fits
    assert [e['file'] for e in Manifest(folder(first)).live()] == ['ckpt_f003_s0001.pth', 'ckpt_f003_s0002.pth']
    assert not list(folder(first).glob('ckpt_f001_s*.pth')) and (folder(first)/'ckpt_f002_avg.pth').exists()


def test_a_save_is_recorded_and_rotated_in_one_write(tmp_path, monkeypatch):
    "No manifest on disk ever lists more than keep= live saves, so a kill just after a save is recorded cannot leave more"
    live_at_writes, write = [], Manifest.write
    def counting(self):
        live_at_writes.append(len(self.live()))
        write(self)
    monkeypatch.setattr(Manifest, 'write', counting)
    fit(digits_learner(path=tmp_path), 5, [SaveEvery(epochs=1, keep=2, background=False)])
    assert len(live_at_writes) >= 5 and max(live_at_writes) == 2, live_at_writes


def test_rotation_never_deletes_a_name_it_did_not_give(tmp_path):
    learn = digits_learner(path=tmp_path)
    fit(learn, 2, [SaveEvery(epochs=1)])
    d = folder(learn)
    other = d/'other_manifest.json'; other.write_text('{"not": "ours"}')
    (d/'ckpt_f001_s0002_notes.txt').write_text('mine')
    p = d/'ckpt_manifest.json'; data = json.loads(p.read_text())  # a hand edit that lists foreign files as checkpoints
    for name in ('other_manifest.json', 'ckpt_manifest.json', 'ckpt_f001_s0002_notes.txt'):
        data['checkpoints'].insert(0, dict(file=name, fit=1, bytes=1, hash='xxh3_128:0'))
    p.write_text(json.dumps(data))
    fit(learn, 3, [SaveEvery(epochs=1, keep=1, keep_scope='all')])
    assert other.read_text() == '{"not": "ours"}' and (d/'ckpt_f001_s0002_notes.txt').read_text() == 'mine'
    assert sorted(q.name for q in d.glob('ckpt_f*.pth')) == ['ckpt_f002_s0003.pth']


def test_keep_scope_is_checked_when_the_callback_is_built():
    with pytest.raises(ValueError, match=r"keep_scope='fits': pass 'fit' .* or 'all'"): SaveEvery(epochs=1, keep=2, keep_scope='fits')


def test_an_average_whose_record_fails_is_removed(tmp_path, monkeypatch):
    learn = digits_learner(path=tmp_path)
    real = Manifest.write
    def write(self):
        if self.averages: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self)
    monkeypatch.setattr(Manifest, 'write', write)
    with pytest.raises(OSError, match='No space left'): fit(learn, 2, [SaveEvery(epochs=1), AverageLast(2)])
    assert not (folder(learn)/'ckpt_f001_avg.pth').exists()
    m = Manifest(folder(learn))
    assert m.averages == [] and len(m.live()) == 2 and m.verify()


def test_a_checkpoint_whose_record_fails_is_removed_and_nothing_is_recorded(tmp_path, monkeypatch):
    learn = digits_learner(path=tmp_path)
    real = Manifest.write
    def write(self):
        if any(e.get('epoch') == 2.0 for e in self.checkpoints): raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(self)
    monkeypatch.setattr(Manifest, 'write', write)
    with pytest.warns(UserWarning, match='Input/output error'): fit(learn, 3, [SaveEvery(epochs=1)])
    m = Manifest(folder(learn))
    assert [e['epoch'] for e in m.live()] == [1.0, 3.0] and m.verify()  # epoch 2's save: neither recorded nor on disk
    assert sorted(p.name for p in folder(learn).iterdir()) == ['ckpt_f001_s0001.pth', 'ckpt_f001_s0002.pth', 'ckpt_manifest.json']  # its name is free again


def test_threads_adding_through_their_own_manifest_objects_lose_nothing(tmp_path):
    "The lock also orders threads of one process (flock locks open files, not processes)"
    import threading
    views = [Manifest(tmp_path) for _ in range(4)]
    fits = [v.start_fit() for v in views]
    def add(v, fit):
        for n in range(1, 26):
            name = checkpoint_name('ckpt', fit, n)
            v.add_checkpoint(dict(file=name, fit=fit, **atomic_write(tmp_path/name, lambda f: f.write(b'w'), overwrite=False)))
    ts = [threading.Thread(target=add, args=(v, f)) for v, f in zip(views, fits)]
    for t in ts: t.start()
    for t in ts: t.join()
    m = Manifest(tmp_path)
    assert sorted(fits) == [1, 2, 3, 4] and len(m.checkpoints) == 100 and m.verify()
