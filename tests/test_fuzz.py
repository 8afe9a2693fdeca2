"""Differential fuzz test: thousands of mutants of real checkpoint files, each read by `read_checkpoint` and by the reference
reader (`torch.load(weights_only=True)`, or the safetensors package). Our reader may refuse more than the reference,
never less, and never return other tensors. Seeded and bounded in time: FUZZ_SECONDS of mutants (default 45, about a
minute with the set-up) from FUZZ_SEED (default 0); `pytest -s` prints the count of each outcome."""
import collections, json, os, random, selectors, subprocess, sys, time
from pathlib import Path
import pytest, torch
from fuzzing import mutate
from helpers import fit

safetensors_torch = pytest.importorskip('safetensors.torch')
HERE = Path(__file__).parent
SECONDS, SEED = float(os.environ.get('FUZZ_SECONDS', 45)), int(os.environ.get('FUZZ_SEED', 0))


@pytest.fixture(scope='module')
def seeds(tmp_path_factory):
    "Real files: fastai saves of a short digits training (with and without optimizer, and SaveEvery's), torch and safetensors files"
    from ckpt_avg.demo import digits_learner
    from ckpt_avg.formats import read_checkpoint, write_checkpoint
    from ckpt_avg.save import SaveEvery
    d = tmp_path_factory.mktemp('seeds')
    learn = digits_learner(path=d)
    fit(learn, 1, [SaveEvery(epochs=1, with_opt=True)])
    models = d/'models'
    learn.save('with_opt', with_opt=True); learn.save('no_opt', with_opt=False)
    sd = learn.model.state_dict()
    torch.manual_seed(0)
    small = {'w': torch.randn(3, 4), 'b': torch.arange(3), 'h': torch.randn(5).half(), 't': torch.randn(4, 2).t(), 'e': torch.zeros(0, 3)}
    torch.save(sd, models/'state_dict.pth')
    torch.save(small, models/'small.pth')
    torch.save(small, models/'legacy.pth', _use_new_zipfile_serialization=False)
    torch.save({'model': small, 'opt': {'shape': torch.Size([3, 4])}}, models/'via_torch_load.pth')  # torch.Size: read by torch.load
    write_checkpoint(sd, models/'ours.pth', 'fastai')
    small.pop('t')  # safetensors stores contiguous tensors only
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, models/'theirs.safetensors')
    safetensors_torch.save_file(small, models/'small.safetensors')
    write_checkpoint(sd, models/'ours.safetensors', 'safetensors')
    files = sorted(p for p in models.iterdir() if p.suffix in ('.pth', '.safetensors'))
    assert any(p.name.startswith('ckpt_') for p in files)  # SaveEvery's file is among them
    assert read_checkpoint(models/'via_torch_load.pth').mapping is None  # one seed takes the torch.load path (pre-scanned)
    return [(p, 'safetensors' if p.suffix == '.safetensors' else 'legacy' if p.name == 'legacy.pth' else 'zip') for p in files]


class Worker:
    "fuzz_worker.py in a subprocess, restarted when a reader kills it or hangs"
    def __init__(self): self.proc = None
    def start(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
        self.proc = subprocess.Popen([sys.executable, str(HERE/'fuzz_worker.py')], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.sel, self.buf = selectors.DefaultSelector(), b''
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        assert self.read(120) == {'ready': True}
    def read(self, timeout):
        "The next JSON line of the worker, or None if it died or said nothing for `timeout` seconds"
        deadline = time.monotonic() + timeout
        while b'\n' not in self.buf:
            if not self.sel.select(max(0, deadline - time.monotonic())): return None
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)  # not readline: a buffered line would hide from select
            if not chunk: return None
            self.buf += chunk
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)
    def stop(self):
        if self.proc: self.proc.kill(); self.proc.wait(); self.proc = None
    def ask(self, path, kind, timeout=30):
        "The outcome for the file at `path`; a worker that dies or hangs is classified by how far it got"
        if self.proc is None: self.start()
        self.proc.stdin.write(json.dumps([str(path), kind]) + '\n'); self.proc.stdin.flush()
        ours = self.read(timeout)
        if ours is None: self.stop(); return 'FAIL_crash_or_hang', 'our reader'
        done = self.read(timeout)
        if done is not None: return done['outcome'], done['detail']
        self.stop()  # the reference crashed, hung or ran out of memory: it refused
        return ('both_refuse_reference_crashed' if ours['ours'] == 'refuse' else 'FAIL_' + ours['ours']), ours['detail']


def test_differential_fuzz(seeds, tmp_path):
    rng, counts, fails, worker = random.Random(SEED), collections.Counter(), [], Worker()
    originals = [(p, kind, p.read_bytes()) for p, kind in seeds]
    try:
        for p, kind, _ in originals:  # the unmutated files: both read them, equal
            assert worker.ask(p, 'safetensors' if kind == 'safetensors' else 'torch')[0] == 'equal', p
        start, n = time.monotonic(), 0
        while time.monotonic() - start < SECONDS:
            p, kind, b = originals[n % len(originals)]
            mutant, how = mutate(rng, b, kind)
            f = tmp_path/f'mutant{p.suffix}'
            f.write_bytes(mutant)
            outcome, detail = worker.ask(f, 'safetensors' if kind == 'safetensors' else 'torch')
            counts[outcome] += 1; n += 1
            if outcome.startswith('FAIL'):
                keep = tmp_path/f'fail{len(fails)}_{p.stem}{p.suffix}'
                keep.write_bytes(mutant)
                fails.append(f'{outcome} on {p.name} ({how}): {detail} -> {keep}')
        took = time.monotonic() - start
    finally: worker.stop()
    print(f"\n{n} mutants in {took:.0f} s ({n/took:.0f}/s), seed {SEED}:")
    for k, v in sorted(counts.items()): print(f"  {k:32} {v:6}")
    assert n >= 500, "too few mutants for a meaningful run"
    assert not fails, '\n'.join(fails[:20])
