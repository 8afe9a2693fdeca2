"""Resume: a fresh process loads a checkpoint with its optimizer state and trains on with the same SaveEvery.

The manifest continues (fit 2), no file of fit 1 is touched, and AverageLast(scope='all') spans both processes.
"""
import json, os, subprocess, sys
from pathlib import Path
import torch
from ckpt_avg.manifest import Manifest, file_hash
from ckpt_avg.core import average_checkpoints

ROOT = Path(__file__).resolve().parents[1]

FIRST = r'''
import sys, warnings; warnings.filterwarnings('ignore')
from ckpt_avg.all import *
learn = digits_learner(path=sys.argv[1])
with learn.no_bar(), learn.no_logging(): learn.fit(3, 0.1, cbs=[SaveEvery(epochs=1, with_opt=True)])
'''

RESUME = r'''
import sys, json, warnings; warnings.filterwarnings('ignore')
import torch
from ckpt_avg.all import *
learn = digits_learner(path=sys.argv[1], seed=1)   # another seed: everything must come from the checkpoint
learn.load('ckpt_f001_s0003', with_opt=True)
saved = torch.load(learn.path/learn.model_dir/'ckpt_f001_s0003.pth', weights_only=False)
out = dict(model_loaded=all(torch.equal(v, saved['model'][k]) for k, v in learn.model.state_dict().items()),
           opt_loaded=len(learn.opt.state_dict()['state']) == len(saved['opt']['state']) > 0 and all(
               torch.equal(a, b) for s, t in zip(learn.opt.state_dict()['state'], saved['opt']['state'])
               for a, b in zip([v for v in s.values() if isinstance(v, torch.Tensor)], [v for v in t.values() if isinstance(v, torch.Tensor)])))
avg = AverageLast(4, scope='all')
with learn.no_bar(), learn.no_logging(): learn.fit(3, 0.1, cbs=[SaveEvery(epochs=1, with_opt=True), avg])
out['inputs'] = [str(f) for f in avg.files]
out['final'] = {k: v.tolist() for k, v in learn.model.state_dict().items()}
print(json.dumps(out))
'''

def run(code, path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_resume_in_a_fresh_process_continues_the_manifest(tmp_path):
    models = tmp_path/'models'
    run(FIRST, tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in models.glob('*.pth')}
    assert sorted(before) == [f'ckpt_f001_s000{i}.pth' for i in (1, 2, 3)]

    out = json.loads(run(RESUME, tmp_path).strip().splitlines()[-1])
    assert out['model_loaded'] and out['opt_loaded']

    m = Manifest(models)
    assert [f['fit'] for f in m.fits] == [1, 2]
    assert [e['file'] for e in m.checkpoints] == [f'ckpt_f00{f}_s000{i}.pth' for f in (1, 2) for i in (1, 2, 3)]
    assert m.verify() and all(e['with_opt'] for e in m.checkpoints)
    for name, (data, mtime) in before.items():  # fit 1's files: not rewritten, not even touched
        assert (models/name).read_bytes() == data and (models/name).stat().st_mtime_ns == mtime

    # AverageLast(4, scope='all') took the last save of the first process and the three of the second
    want = ['ckpt_f001_s0003.pth', 'ckpt_f002_s0001.pth', 'ckpt_f002_s0002.pth', 'ckpt_f002_s0003.pth']
    assert [Path(f).name for f in out['inputs']] == want
    avg = m.data['averages'][-1]
    assert avg['file'] == 'ckpt_f002_avg.pth' and avg['inputs'] == want and avg['fit'] == 2
    expected = average_checkpoints([models/f for f in want])
    assert all(torch.equal(torch.tensor(out['final'][k], dtype=v.dtype), v) for k, v in expected.items())
    saved = torch.load(models/'ckpt_f002_avg.pth', weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
