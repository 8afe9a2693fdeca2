"""Crash safety: training with SaveEvery is killed with SIGKILL at chosen and at random moments; nothing is lost.

A "zygote" subprocess imports torch, fastai and ckpt_avg once, then forks one child per kill, so each kill costs
the child's run time, not a 3 s import. Each child trains digits with `SaveEvery(batches=2, keep=3, keep_scope='all')` in a folder
shared by the whole sequence (so rotation deletes files of earlier fits too) and dies by SIGKILL:
- at a chosen point: just before or just after the n-th `os.replace` (the manifest's rename), the n-th `os.link`
  (a checkpoint's or an average's new name), the n-th `os.unlink` (rotation, a temporary after its link, a lock
  file), or in the middle of the n-th write of a file's bytes; the child kills itself;
- at a random moment: the test kills it after a random delay, while every write, rename and unlink is slowed down
  a little so that random kills land in them often.
After every kill the folder is checked (see `Folder.check`). Failures to save (full disk, no permission) are below.
"""
import errno, json, os, random, shutil, signal, subprocess, sys, time, warnings
from pathlib import Path
import pytest, torch
from fastai.callback.core import Callback
from ckpt_avg.manifest import Manifest, file_hash
from ckpt_avg.core import average_checkpoints, load_state
from ckpt_avg.save import SaveEvery, SaveEveryNCallback
from ckpt_avg.average import AverageLast
from ckpt_avg.demo import digits_learner
from helpers import fit

ROOT = Path(__file__).resolve().parents[1]

ZYGOTE = r'''
import json, os, signal, sys, time, traceback, warnings
warnings.filterwarnings('ignore')
import torch; torch.set_num_threads(1)
import ckpt_avg.files as files
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
from ckpt_avg.demo import digits_learner

def die(): os.kill(os.getpid(), signal.SIGKILL)

def hook(mod, name, kind, point, slow):
    "Wrap mod.name: count calls; sleep `slow`; SIGKILL this process before/after the call chosen by `point`"
    real, n = getattr(mod, name), [0]
    def f(*a, **k):
        n[0] += 1
        hit = point is not None and point[0] == kind and point[1] == n[0]
        if hit and point[2] == 'before': die()
        if slow: time.sleep(slow)
        res = real(*a, **k)
        if hit: die()
        return res
    setattr(mod, name, f)

def child(cmd):
    devnull = os.open(os.devnull, os.O_WRONLY); os.dup2(devnull, 1)
    point, slow = cmd.get('point'), cmd.get('slow', 0)
    hook(os, 'replace', 'replace', point, slow)
    hook(os, 'unlink', 'unlink', point, slow)
    hook(os, 'link', 'link', point, slow)
    hook(files._HashingWriter, 'write', 'write', point, slow/20)  # 'before': dies with part of the file written
    learn = digits_learner(path=cmd['path'], seed=cmd['seed'])
    for dl in learn.dls.loaders: dl.fake_l.num_workers = 0  # no worker processes: the hooks and kills are for this one
    cbs = [SaveEvery(batches=2, keep=3, keep_scope='all', with_opt=cmd.get('with_opt', False))]
    if cmd.get('average'): cbs.append(AverageLast(3, scope='all'))
    with learn.no_bar(), learn.no_logging(): learn.fit(cmd.get('epochs', 2), 0.1, cbs=cbs)

print('ready', flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd['op'] == 'run':
        pid = os.fork()
        if pid == 0:
            code = 0
            try: child(cmd)
            except BaseException: traceback.print_exc(); code = 1
            sys.stderr.flush(); os._exit(code)
        print(pid, flush=True)
    elif cmd['op'] == 'wait':
        print(os.waitpid(cmd['pid'], 0)[1], flush=True)
'''

class Zygote:
    "A subprocess that has imported fastai and forks a training child on request"
    def __init__(self, log):
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
        self.log = open(log, 'w')
        self.p = subprocess.Popen([sys.executable, '-c', ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True, env=env)
        assert self.p.stdout.readline().strip() == 'ready', Path(log).read_text()
    def _ask(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + '\n'); self.p.stdin.flush()
        return int(self.p.stdout.readline())
    def start(self, **cmd): return self._ask(op='run', **cmd)
    def wait(self, pid)->int:
        "The child's fate: -9 killed by SIGKILL, 0 finished, 1 raised"
        st = self._ask(op='wait', pid=pid)
        return -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)
    def close(self):
        self.p.stdin.close(); self.p.wait(30); self.log.close()


class Folder:
    "What a sequence of killed runs in one folder promised so far, checked after each kill"
    def __init__(self, path):
        self.path, self.models = Path(path), Path(path)/'models'
        self.seen = {}       # every checkpoint file name ever seen on disk -> (hash, bytes)
        self.temps = set()   # temporaries seen after the last kill
        self.kills = self.bytes_lost = self.fit_at_temps = 0
        self.mid_write, self.orphans, self.pending = 0, set(), set()  # kills that left a temporary; files not yet listed; not yet deleted

    def check(self):
        d = self.models
        if not (d/'ckpt_manifest.json').exists():  # killed before the first manifest write: nothing was promised
            assert not self.seen
            return
        m = Manifest(d)  # a manifest that exists is whole, valid JSON of our schema
        live, removed = m.live(), {e['file'] for e in m.checkpoints if e.get('removed')}
        listed = [e['file'] for e in m.checkpoints + m.data['averages']]
        assert len(listed) == len(set(listed)), "a file name listed twice: a checkpoint was overwritten"
        assert not [f for f in listed if f.startswith('.') or f.endswith('.tmp')], "a temporary file is listed"
        assert len(live) <= 3 + 1, "rotation left more than keep+1 files (one may be pending deletion)"
        fits = [e['fit'] for e in m.checkpoints]
        assert fits == sorted(fits), "a later fit reused an earlier fit's id"
        # nothing lost: every file seen before is still there with the same bytes, unless rotation removed it
        for name, (h, n) in self.seen.items():
            p = d/name
            if name in removed: continue
            if not p.exists() or file_hash(p) != h: self.bytes_lost += n
        assert self.bytes_lost == 0, f"lost or changed: {[n for n in self.seen if n not in removed and not (d/n).exists()]}"
        m.verify(live)  # every live checkpoint exists, whole, with its recorded size and hash
        for e in live + m.data['averages']:
            if (d/e['file']).exists(): self.seen.setdefault(e['file'], (e['hash'], e['bytes']))
        for p in d.glob('ckpt_*.pth'):  # files renamed into place but not (yet) in the manifest: whole, and kept
            if p.name not in listed: load_state(p); self.orphans.add(p.name)
            elif p.name in removed: self.pending.add(p.name)
            self.seen.setdefault(p.name, (file_hash(p), p.stat().st_size))
        # temporaries of dead processes are gone once a later fit has saved (its first save cleans them)
        temps = set(d.glob('.*.tmp'))
        self.mid_write += bool(temps - self.temps)
        if self.temps and m.checkpoints and m.checkpoints[-1]['fit'] > self.fit_at_temps:
            assert not (self.temps & temps), f"stale temporaries were not cleaned: {self.temps & temps}"
        self.temps, self.fit_at_temps = temps, (m.checkpoints[-1]['fit'] if m.checkpoints else 0)
        if live: assert average_checkpoints(d)  # what is left averages

    def summary(self): return (f"kills that left a temporary {self.mid_write}, files renamed but not yet listed {len(self.orphans)}, "
                               f"files marked removed but not yet deleted {len(self.pending)}")

    def finish(self, z):
        "A last run, not killed, in the same folder: a new fit continues the manifest, cleans temporaries, averages"
        before = Manifest(self.models) if (self.models/'ckpt_manifest.json').exists() else None
        last_fit = max([e['fit'] for e in before.checkpoints], default=0) if before else 0
        pid = z.start(path=str(self.path), seed=99, average=True, epochs=1)
        assert z.wait(pid) == 0
        self.check()
        m = Manifest(self.models)
        new = [e for e in m.checkpoints if e['fit'] > last_fit]
        assert new and len({e['fit'] for e in new}) == 1
        assert m.data['averages'][-1]['fit'] == new[0]['fit']
        stale = [p for p in self.models.glob('.*.tmp')]
        assert stale == [], f"temporaries left after a clean fit: {stale}"


def run_kills(tmp_path, commands, slow):
    "Start one child per command in one folder; returns (kills, the Folder)"
    z = Zygote(tmp_path/'zygote.log')
    f = Folder(tmp_path/'run')
    try:
        for i, cmd in enumerate(commands):
            delay = cmd.pop('delay', None)
            pid = z.start(path=str(f.path), seed=i, slow=slow, **cmd)
            if delay is not None:
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
            fate = z.wait(pid)
            assert fate in (0, -signal.SIGKILL), f"child {i} ({cmd}) raised; see {tmp_path/'zygote.log'}:\n{(tmp_path/'zygote.log').read_text()[-3000:]}"
            f.kills += fate == -signal.SIGKILL
            f.check()
        f.finish(z)
    finally: z.close()
    return f


def test_sigkill_at_every_kind_of_write_rename_and_delete(tmp_path):
    points = ([['replace', n, w] for n in (1, 2, 3, 4, 5, 6, 8, 11) for w in ('before', 'after')]
              + [['unlink', n, w] for n in (1, 2) for w in ('before', 'after')]
              + [['link', n, w] for n in (1, 2, 5) for w in ('before', 'after')]
              + [['write', n, 'before'] for n in (1, 3, 9, 20)])
    cmds = [dict(point=p, with_opt=i % 2 == 1) for i, p in enumerate(points)]
    f = run_kills(tmp_path, cmds, slow=0)
    print(f"\nchosen points: {f.kills} kills survived / {len(cmds)} tried; bytes lost {f.bytes_lost}; {f.summary()}")
    assert f.kills >= len(cmds) - 2  # every point but the rarest (an unlink may not come) is reached
    assert f.bytes_lost == 0


def test_sigkill_at_random_moments(tmp_path):
    rng = random.Random(int(os.environ.get('CKPT_AVG_KILL_SEED', 0)))
    n = int(os.environ.get('CKPT_AVG_RANDOM_KILLS', 40))
    # 5 epochs take longer than the longest delay even on a fast machine, so (nearly) every child is killed
    cmds = [dict(delay=rng.uniform(0.05, 1.2), epochs=5, with_opt=rng.random() < 0.5, average=rng.random() < 0.3) for _ in range(n)]
    f = run_kills(tmp_path, cmds, slow=0.004)
    print(f"\nrandom moments: {f.kills} kills survived / {n} tried; bytes lost {f.bytes_lost}; {f.summary()}")
    assert f.kills >= n*0.8
    assert f.bytes_lost == 0


# ---------------------------------------------------------------------------------------------------------------
# Saves that fail: a full disk, a read-only folder, a manifest that cannot be written

class FailingSave(SaveEveryNCallback):
    "SaveEvery whose saves number `fail` (1-based, counting tries) write half a file and then hit `err`"
    def __init__(self, fail, err=errno.ENOSPC, **kw):
        super().__init__(**kw); self.fail, self.err, self.tries = fail, err, 0
    def _write_model(self, f):
        self.tries += 1
        if self.tries in self.fail:
            f.write(b'half a checkpoint')
            raise OSError(self.err, os.strerror(self.err))
        super()._write_model(f)

class Record(Callback):
    """After each epoch (after SaveEvery), record the folder: every file's bytes. The tests that use it save with
    background=False, so that the folder is settled at the end of each epoch; test_writer.py has the same failures
    in the background, where a failed write is reported at the next save"""
    order = SaveEveryNCallback.order + 0.5
    def before_fit(self): self.shots = []
    def after_epoch(self):
        d = Path(self.learn.path)/self.learn.model_dir
        self.shots.append({p.name: p.read_bytes() for p in d.iterdir()} if d.exists() else {})


def models(learn): return Path(learn.path)/learn.model_dir

def test_failed_saves_warn_keep_everything_and_training_goes_on(tmp_path):
    learn = digits_learner(path=tmp_path)
    rec = Record()
    with pytest.warns(UserWarning, match=r'could not save a checkpoint .*No space left on device.*intact and training goes on'):
        fit(learn, 5, [FailingSave(fail={3, 4}, epochs=1, keep=2, background=False), rec])
    assert len(learn.recorder.values) == 5  # all 5 epochs trained
    # saves 3 and 4 changed nothing on disk: no file, no temporary, the manifest byte for byte; keep=2 deleted nothing
    assert rec.shots[2] == rec.shots[1] == rec.shots[3]
    assert sorted(rec.shots[1]) == ['ckpt_f001_s0001.pth', 'ckpt_f001_s0002.pth', 'ckpt_manifest.json']
    # the 5th save worked again; only then did rotation delete the oldest file
    m = Manifest(models(learn))
    assert [e['file'] for e in m.live()] == ['ckpt_f001_s0002.pth', 'ckpt_f001_s0003.pth']
    assert m.verify() and sorted(p.name for p in models(learn).iterdir()) == sorted([e['file'] for e in m.live()] + ['ckpt_manifest.json'])
    assert [e['epoch'] for e in m.live()] == [2.0, 5.0]


def test_stop_on_error_stops_training_and_keeps_everything(tmp_path):
    learn = digits_learner(path=tmp_path)
    rec = Record()
    with pytest.raises(OSError, match='Permission denied'):
        fit(learn, 5, [FailingSave(fail={3}, err=errno.EACCES, epochs=1, keep=2, stop_on_error=True, background=False), rec])
    assert len(rec.shots) == 2  # training stopped in epoch 3
    after = {p.name: p.read_bytes() for p in models(learn).iterdir()}
    assert after == rec.shots[1]
    assert Manifest(models(learn)).verify()


def test_a_manifest_that_cannot_be_written_takes_the_save_back(tmp_path, monkeypatch):
    learn = digits_learner(path=tmp_path)
    rec, real = Record(), Manifest.write
    def write(self):  # the write that would record the checkpoint of epoch 3 fails (whichever write that is)
        if any(e.get('epoch') == 3.0 for e in self.checkpoints): raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real(self)
    monkeypatch.setattr(Manifest, 'write', write)
    with pytest.warns(UserWarning, match='Read-only file system'):
        fit(learn, 4, [SaveEvery(epochs=1, background=False), rec])
    assert rec.shots[2] == rec.shots[1]  # the checkpoint of epoch 3 was removed again, the manifest untouched
    m = Manifest(models(learn))
    assert [e['epoch'] for e in m.live()] == [1.0, 2.0, 4.0] and m.verify()


@pytest.fixture
def tiny_disk(tmp_path):
    "A 96 KiB tmpfs: room for about two digits checkpoints and the manifest (skipped where mount is not allowed)"
    mnt = tmp_path/'disk'; mnt.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=96k', 'tmpfs', str(mnt)], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here (needs root)')
    try: yield mnt
    finally: subprocess.run(['umount', '-l', str(mnt)])

def test_a_real_full_disk(tiny_disk):
    learn = digits_learner(path=tiny_disk)
    rec = Record()
    with pytest.warns(UserWarning, match='No space left on device'):
        fit(learn, 4, [SaveEvery(epochs=1, background=False), rec])
    assert len(learn.recorder.values) == 4
    full = next(i for i in range(1, 4) if rec.shots[i] == rec.shots[i-1])  # the first save that did not fit
    assert full >= 2 and rec.shots[-1] == rec.shots[full-1]
    m = Manifest(models(learn))
    assert len(m.live()) == full and m.verify()
    assert not list(models(learn).glob('.*.tmp'))

def test_a_folder_that_turns_read_only(tiny_disk):
    class ReadOnlyAfter2(Callback):
        order = SaveEveryNCallback.order + 0.5
        def after_epoch(self):
            if self.epoch == 1: subprocess.run(['mount', '-o', 'remount,ro', str(tiny_disk)], check=True)
    learn = digits_learner(path=tiny_disk)
    rec = Record()
    with pytest.warns(UserWarning, match='Read-only file system'):
        fit(learn, 3, [SaveEvery(epochs=1, keep=1, background=False), ReadOnlyAfter2(), rec])
    assert len(learn.recorder.values) == 3
    assert rec.shots[2] == rec.shots[1]
    m = Manifest(models(learn))
    assert [e['file'] for e in m.live()] == ['ckpt_f001_s0002.pth'] and m.verify()
