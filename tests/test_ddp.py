"""SaveEvery and AverageLast under fastai's distributed training: 2 processes on the CPU (gloo), launched with torchrun.

The worker (`ddp_worker.py`) trains digits with `learn.distrib_ctx(sync_bn=False, cpu=True)`, fastai's own DDP path
through accelerate; the one CUDA-only line of fastai's `DistributedDL` (its index broadcast) is replaced there by the
same broadcast of a CPU tensor through plain `torch.distributed`.
"""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from ckpt_avg.core import average_checkpoints
from ckpt_avg.manifest import Manifest, file_hash
from helpers import states_equal

pytest.importorskip('accelerate', reason="fastai's distrib_ctx needs accelerate (in settings.ini's dev_requirements)")
WORKER = Path(__file__).with_name('ddp_worker.py')

def torchrun(folder, mode):
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(WORKER.parent.parent)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(WORKER), str(folder), mode], capture_output=True, text=True, timeout=600, env=env)
    outs = [json.loads((folder/f'rank{i}.json').read_text()) for i in range(2) if (folder/f'rank{i}.json').exists()]
    assert len(outs) == 2, f"torchrun exited {r.returncode}:\n{r.stderr[-3000:]}"
    return outs


@pytest.mark.parametrize('mode', ['sync', 'background'])
def test_two_ranks_one_writer_same_saves_same_average(tmp_path, mode):
    r0, r1 = torchrun(tmp_path, mode)
    assert r0['error'] is None and r1['error'] is None, (r0, r1)
    assert r0['backend'] == 'gloo' and r0['world'] == 2 and r0['in_background'] == (mode == 'background')
    # minutes= is decided on rank 0: both ranks saved at the same iterations, though rank 1's own clock said "always"
    assert len(r0['save_iters']) >= 3 and r0['save_iters'] == r1['save_iters']
    # one writer: rank 0 wrote every file, rank 1 none
    assert r0['commits'] == r0['saved'] == len(r0['save_iters']) and r1['commits'] == 0
    models = tmp_path/'models'
    m = Manifest(models)
    names = [e['file'] for e in m.checkpoints]
    assert sorted(p.name for p in models.iterdir()) == sorted(names + ['ckpt_f001_avg.pth', 'ckpt_manifest.json'])  # no temps
    for e in m.checkpoints: assert file_hash(m.file(e)) == e['hash'] and m.file(e).stat().st_size == e['bytes']
    # both ranks end with the same weights: the mean of the last 3 saves, as written to the average file
    s0, s1 = (torch.load(tmp_path/f'rank{i}.state') for i in range(2))
    assert states_equal(s0, s1)
    avg = torch.load(models/'ckpt_f001_avg.pth')
    assert states_equal(s0, avg) and states_equal(avg, average_checkpoints(models, k=3))
    assert m.data['averages'][-1]['inputs'] == names[-3:]

def test_an_average_that_fails_on_rank_0_fails_on_every_rank_without_hanging(tmp_path):
    r0, r1 = torchrun(tmp_path, 'damage')
    assert 'IntegrityError' in r0['error'] and 'ckpt_f001_s' in r0['error']  # the damaged file fails its hash check
    assert 'failed on rank 0' in r1['error'] and 'IntegrityError' in r1['error']
    assert not (tmp_path/'models'/'ckpt_f001_avg.pth').exists()
