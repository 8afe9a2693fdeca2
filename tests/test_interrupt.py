"""A real Ctrl-C during a fit: SIGINT sent to a training subprocess, for each `AverageLast(on_interrupt=)`, and
Jupyter's "interrupt kernel" sent to a kernel running the fit; every file left whole either way"""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from ckpt_avg.manifest import Manifest
from helpers import mean_of, states_equal

SCRIPT = '''
import json, sys, time, torch
from pathlib import Path
from fastai.callback.core import Callback
from ckpt_avg.demo import digits_learner
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast

class Slow(Callback):
    "Slow batches, so that the signal comes while the fit still has far to go"
    def after_batch(self): time.sleep(0.05)

tmp, choice = Path(sys.argv[1]), sys.argv[2]
learn = digits_learner(path=tmp)
avg = AverageLast(5, on_interrupt=choice, report=False)
try:
    with learn.no_bar(), learn.no_logging(): learn.fit(50, 0.1, cbs=[SaveEvery(epochs=1), avg, Slow()])
    ended = 'returned'
except KeyboardInterrupt: ended = 'KeyboardInterrupt'
torch.save(learn.model.state_dict(), tmp/'model_after.pth')
(tmp/'result.json').write_text(json.dumps(dict(ended=ended, epoch=learn.epoch, interrupted=getattr(avg, 'interrupted', None),
                                               entries=[e['file'] for e in avg.entries])))
'''

def live_saves(folder:Path)->list:
    try: return [e for e in json.loads((folder/'ckpt_manifest.json').read_text())['checkpoints'] if not e.get('removed')]
    except (FileNotFoundError, ValueError): return []  # not written yet

def wait_for_saves(folder:Path, n:int, alive=lambda: True, timeout:float=300):
    "Wait until the manifest in `folder` lists `n` live saves (a guard against hanging, not a timing check)"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(live_saves(folder)) >= n: return
        assert alive(), "the fit ended before it saved twice"
        time.sleep(0.05)
    raise AssertionError(f"no {n} saves in {folder} after {timeout} s")

def check_whole(folder:Path):
    "Nothing half-written: no temporary file left, every recorded file with its recorded size and hash"
    assert not list(folder.glob('.*.tmp')), list(folder.glob('.*.tmp'))
    m = Manifest(folder)
    assert m.verify() == m.live()
    for a in m.averages: assert (folder/a['file']).stat().st_size == a['bytes']
    return m

def load(p): return torch.load(p, weights_only=True)

@pytest.mark.parametrize('choice', ['average', 'save', 'leave'])
def test_sigint_to_a_training_process(tmp_path, choice):
    proc = subprocess.Popen([sys.executable, '-c', SCRIPT, str(tmp_path), choice], stderr=subprocess.PIPE, text=True,
                            env=os.environ | dict(OMP_NUM_THREADS='1'))
    try:
        wait_for_saves(tmp_path/'models', 2, alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally: proc.kill()
    assert proc.returncode == 0, err
    res = json.loads((tmp_path/'result.json').read_text())
    m = check_whole(tmp_path/'models')
    live = [e['file'] for e in m.live()]
    assert res['epoch'] < 49  # stopped, not trained to the end
    if choice == 'leave':
        assert res['ended'] == 'KeyboardInterrupt' and not res['interrupted'] and m.averages == [] and res['entries'] == []
        return
    assert res['ended'] == 'KeyboardInterrupt' and res['interrupted'] is True, err  # raised once the callbacks finished
    assert 'Interrupted: the fit stops after this batch' in err
    assert [e['trigger'] for e in m.live()][-1] == ('interrupt' if choice == 'save' else 'epochs')
    assert all(e['trigger'] == 'epochs' for e in m.live()[:-1])
    assert res['entries'] == live[-5:] and m.averages[-1]['inputs'] == live[-5:]
    avg = mean_of([load(tmp_path/'models'/f) for f in live[-5:]])
    assert states_equal(load(tmp_path/'models'/m.averages[-1]['file']), avg)
    assert states_equal(load(tmp_path/'model_after.pth'), avg)  # the model ends with the average


KERNEL = 'ckpt-avg-interrupt-tests'

@pytest.fixture
def kernel(tmp_path, monkeypatch):
    "A Jupyter kernel of this Python (its venv, its PYTHONPATH), started in `tmp_path`"
    jupyter_client = pytest.importorskip('jupyter_client')
    spec = tmp_path/'jupyter'/'kernels'/KERNEL
    spec.mkdir(parents=True)
    (spec/'kernel.json').write_text(json.dumps(dict(argv=[sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
                                                    display_name='ckpt_avg tests', language='python')))
    monkeypatch.setenv('JUPYTER_PATH', str(tmp_path/'jupyter'))
    km = jupyter_client.KernelManager(kernel_name=KERNEL)
    km.start_kernel(cwd=str(tmp_path), env=os.environ | dict(OMP_NUM_THREADS='1', MPLBACKEND='Agg'))
    kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=120)
    yield km, kc
    kc.stop_channels(); km.shutdown_kernel(now=True)

def run_cell(kc, code, wait=True, timeout=300):
    "Execute `code`; with `wait`, return (status, printed text) once it is done"
    msg_id = kc.execute(code)
    return reply(kc, msg_id, timeout) if wait else msg_id

def reply(kc, msg_id, timeout=300):
    out, status = [], None
    while True:  # the cell's output, until the kernel is idle again
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg['parent_header'].get('msg_id') != msg_id: continue
        if msg['msg_type'] == 'stream': out.append(msg['content']['text'])
        if msg['msg_type'] == 'error': out.append(msg['content']['ename']); status = 'error'
        if msg['msg_type'] == 'status' and msg['content']['execution_state'] == 'idle': break
    return status or 'ok', ''.join(out)

def test_jupyter_interrupt_kernel_averages_then_stops_the_cell_and_the_next_cell_sees_it(kernel, tmp_path):
    km, kc = kernel
    status, out = run_cell(kc, '''
import time, signal, torch
from fastai.callback.core import Callback
from ckpt_avg.demo import digits_learner
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
class Slow(Callback):
    def after_batch(self): time.sleep(0.05)
learn = digits_learner(path='.')
avg = AverageLast(5, report=False)
''')
    assert status == 'ok', out
    fit = run_cell(kc, "with learn.no_bar(): learn.fit(50, 0.1, cbs=[SaveEvery(epochs=1), avg, Slow()])", wait=False)
    wait_for_saves(tmp_path/'models', 2)
    km.interrupt_kernel()
    status, out = reply(kc, fit)
    assert status == 'error' and out.endswith('KeyboardInterrupt'), out  # the cell stops as interrupted cells do ...
    assert 'the fit was interrupted (Ctrl-C)' in out, out                 # ... after AverageLast said what it did
    status, out = run_cell(kc, '''
import json
print(json.dumps(dict(interrupted=avg.interrupted, epoch=learn.epoch, entries=[e['file'] for e in avg.entries],
                      handler_back=signal.getsignal(signal.SIGINT) is signal.default_int_handler)))
torch.save(learn.model.state_dict(), 'model_after.pth')
''')
    assert status == 'ok', out
    res = json.loads(out.strip().splitlines()[-1])
    m = check_whole(tmp_path/'models')
    live = [e['file'] for e in m.live()]
    assert res['interrupted'] and res['epoch'] < 49 and res['entries'] == live[-5:]
    assert states_equal(load(tmp_path/'model_after.pth'), mean_of([load(tmp_path/'models'/f) for f in live[-5:]]))
