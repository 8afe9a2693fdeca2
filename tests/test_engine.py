"The averaging engine: exactness in every float dtype, averaging into a live model, and peak memory near one model"
import importlib.util, json, os, subprocess, sys, textwrap
from importlib.util import find_spec
import numpy as np
from pathlib import Path
import pytest, torch
from fastai.learner import save_model
from fastai.optimizer import Adam
from ckpt_avg.core import average_checkpoints, average_to_file, load_state
from ckpt_avg.formats import read_checkpoint, write_checkpoint

ROOT = Path(__file__).parents[1]


def noisy_saves(folder, dtype, k=5, n=10_000, fmt='state_dict'):
    torch.manual_seed(0)
    base = torch.randn(n)
    files = []
    for i in range(k):
        f = folder/f'c{i}.{fmt}'
        write_checkpoint({'w': (base + torch.randn(n)*1e-2).to(dtype), 'm': torch.randn(3, 7).to(dtype), 'n': torch.tensor(i)}, f, fmt)
        files.append(f)
    return files


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('fmt', ['state_dict', 'safetensors'])
def test_every_element_is_the_correctly_rounded_mean(tmp_path, dtype, fmt):
    files = noisy_saves(tmp_path, dtype, fmt=fmt)
    states = [{k: v.clone() for k, v in load_state(f).items()} for f in files]
    avg = average_checkpoints(files, chunk=999)  # a chunk size that does not divide the tensors
    for k in ('w', 'm'):
        ref = (sum(s[k].double() for s in states)/len(states)).to(dtype)
        assert avg[k].dtype == dtype and torch.equal(avg[k], ref), k
    assert avg['n'].dtype == torch.int64 and avg['n'].item() == 4
    # a float32 accumulator is not exact: the test would notice an engine that used one
    if dtype == torch.float32:
        f32 = (sum(s['w'] for s in states)/len(states))
        assert not torch.equal(f32, avg['w'])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.complex64])
def test_threads_split_a_tensor_without_changing_a_bit(tmp_path, dtype):
    "torch's thread count splits large tensors into parts run on Python threads: any count gives the same bits"
    torch.manual_seed(0)
    files = []
    for i in range(4):
        files.append(tmp_path/f'c{i}.pth')
        torch.save({'w': torch.randn(100_003).to(dtype), 'b': torch.randn(5).to(dtype)}, files[-1])
    before = torch.get_num_threads()
    try:
        res = {}
        for threads in (1, 2, 3, 7):
            torch.set_num_threads(threads)
            res[threads] = (average_checkpoints(files, chunk=4096), average_checkpoints(files, chunk=4096, weights=[1, 2, 3, 4]))
    finally: torch.set_num_threads(before)
    states = [torch.load(f) for f in files]
    wide = torch.complex128 if dtype.is_complex else torch.float64
    ref = (sum(s['w'].to(wide) for s in states)/4).to(dtype)
    for threads, (plain, weighted) in res.items():
        assert torch.equal(plain['w'], ref), threads
        assert all(torch.equal(weighted[k], res[1][1][k]) and torch.equal(plain[k], res[1][0][k]) for k in ('w', 'b')), threads


def test_weighted_mean_is_exact(tmp_path):
    files = noisy_saves(tmp_path, torch.bfloat16, k=3)
    states = [load_state(f) for f in files]
    w = [1., 3., 4.]
    ref = sum(wi/8*s['w'].double() for wi, s in zip(w, states)).to(torch.bfloat16)
    assert torch.equal(average_checkpoints(files, weights=w)['w'], ref)


def test_average_into_a_live_model_with_optimizer_files(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    opt = Adam(model.parameters(), lr=1e-2)
    files, states = [], []
    for i in range(4):
        model(torch.randn(16, 5)).sum().backward(); opt.step(); opt.zero_grad()
        save_model(tmp_path/f's{i}.pth', model, opt, with_opt=True)
        files.append(tmp_path/f's{i}.pth'); states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert read_checkpoint(files[0]).has_opt
    fresh = average_checkpoints(files)
    sd = model.state_dict()
    ptrs = {k: v.data_ptr() for k, v in sd.items()}
    res = average_checkpoints(files, into=sd)
    assert res is sd and {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs  # written in place
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k]), k
        if v.is_floating_point(): assert torch.equal(v, (sum(s[k].double() for s in states)/4).float()), k
    assert model.state_dict()['1.num_batches_tracked'].item() == 4


MEM_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    from ckpt_avg.core import average_checkpoints
    kernel = os.environ['KERNEL']
    def status(key): return next(int(l.split()[1])*1024 for l in open('/proc/self/status') if l.startswith(key))
    files = sys.argv[2:]
    torch.save({'w': torch.ones(1<<20), 'n': torch.tensor(1)}, files[0] + '.tiny')
    average_checkpoints([files[0] + '.tiny']*2, kernel=kernel)  # first use of the kernels maps their code: not the engine's memory
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the present RSS
    before = status('VmRSS:')
    if sys.argv[1] == '0':  # to see the test fail: keep every mapped page
        import ckpt_avg.formats; ckpt_avg.formats.Checkpoint.release = lambda self, t: None
    if sys.argv[1] == 'file':
        from ckpt_avg.core import average_to_file
        from ckpt_avg.core import load_state
        average_to_file(files, files[0] + '.avg', kernel=kernel)
        avg = load_state(files[0], mmap=True)  # only its sizes are read: a copy would count in the peak
    else: avg = average_checkpoints(files, kernel=kernel)
    print(json.dumps(dict(net=status('VmHWM:') - before, model=sum(t.numel()*t.element_size() for t in avg.values()),
                          largest=max(t.numel()*t.element_size() for t in avg.values()))))
''')


def net_peak(files, release=True, mode=None, kernel='numpy'):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', KERNEL=kernel)
    r = subprocess.run([sys.executable, '-c', MEM_SCRIPT, mode or ('1' if release else '0'), *map(str, files)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access('/proc/self/clear_refs', os.W_OK), reason='needs Linux /proc/self/clear_refs to reset the peak')
def test_peak_memory_stays_near_one_model(tmp_path):
    """5 checkpoints of 134 MB (two 67 MB tensors): the average's net peak is one model plus a fixed 32 MiB at most
    (4 MB of float64 scratch, the 4 MiB release window, and the kernel mapping whole large folios ahead of the reads);
    that is <= 1.1 x the model from about 330 MB up (bench/avg_bench.py measures the ratio at 100 MB-1.2 GB)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 4096), torch.nn.BatchNorm1d(4096))
    files = []
    with torch.no_grad():
        for i in range(5):
            for p in model.parameters(): p.add_(torch.randn_like(p)*1e-3)
            torch.save(model.state_dict(), tmp_path/f'm{i}.pth')
            files.append(tmp_path/f'm{i}.pth')
    del model
    m = net_peak(files)
    assert m['net'] <= m['model'] + (32<<20), f"net peak {m['net']/m['model']:.2f} x the model"
    kept = net_peak(files, release=False)  # the measure can fail: without releasing pages the peak is ~K+1 models
    assert kept['net'] > 3*kept['model'], kept
    # straight to a file (what `ckpt_avg average` does): one buffer of the largest tensor, never the whole average
    f = net_peak(files, mode='file')
    assert f['net'] <= f['largest'] + (32<<20), f"net peak {f['net']/f['model']:.2f} x the model"
    if find_spec('numba'):  # the numba kernel streams and gives pages back the same way
        nb = net_peak(files, kernel='numba')
        assert nb['net'] <= nb['model'] + (32<<20), f"numba kernel: net peak {nb['net']/nb['model']:.2f} x the model"


def numba_or_skip():
    try: import ckpt_avg.fused
    except ImportError as e: pytest.skip(f'numba is not installed here ({e}); `pip install "ckpt_avg[numba]"` tests its kernel')


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('threads', [1, 2])
def test_numba_kernel_gives_the_same_bits(tmp_path, dtype, threads, monkeypatch):
    "kernel='numba' (one compiled pass) against the numpy kernel: plain and weighted, tensors over several windows, any threads"
    numba_or_skip()
    monkeypatch.setattr(torch, 'get_num_threads', lambda: threads)
    files = noisy_saves(tmp_path, dtype, n=3*(1<<18) + 12_345)
    states = [{k: v.clone() for k, v in load_state(f).items()} for f in files]
    ref = (sum(s['w'].double() for s in states)/len(states)).to(dtype)
    w = [1, 2, 3, 0.5, 7]
    for chunk in (1<<18, 999):  # the default, and a chunk that divides nothing
        fast, slow = average_checkpoints(files, kernel='numba', chunk=chunk), average_checkpoints(files, kernel='numpy', chunk=chunk)
        assert torch.equal(fast['w'], ref) and torch.equal(fast['m'], slow['m']) and fast['n'].item() == 4
        fast_w, slow_w = average_checkpoints(files, weights=w, kernel='numba', chunk=chunk), average_checkpoints(files, weights=w, kernel='numpy', chunk=chunk)
        assert torch.equal(fast_w['w'], slow_w['w']) and torch.equal(fast_w['m'], slow_w['m'])
    out = tmp_path/'avg.safetensors'
    average_to_file(files, out, 'safetensors', kernel='numba')
    assert torch.equal(load_state(out)['w'], ref)


def test_numba_kernel_does_the_work_where_asked_and_auto_where_it_pays(tmp_path, monkeypatch):
    numba_or_skip()
    import ckpt_avg.kernels as kernels
    files = noisy_saves(tmp_path, torch.float32)
    used = []
    real = kernels._numba_window
    monkeypatch.setattr(kernels, '_numba_window', lambda *a: (lambda *b: used.append(b[2][0].dtype) or real(*a)(*b)))
    average_checkpoints(files, kernel='numpy'); assert not used
    average_checkpoints(files, kernel='numba'); assert used and set(used) == {np.dtype('float32')}
    used.clear()
    monkeypatch.delitem(sys.modules, 'ckpt_avg.fused')  # a fresh process: numba not loaded yet
    average_checkpoints(files); assert not used  # 'auto' on 0.2 MB of inputs: not worth loading numba
    monkeypatch.setattr(kernels, '_NUMBA_PAYS', 1)
    average_checkpoints(files); assert used  # 'auto' on inputs large enough


def test_a_kernel_that_cannot_load_or_is_unknown_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import ckpt_avg.kernels as kernels
    files = noisy_saves(tmp_path, torch.float32)
    out = tmp_path/'avg.pth'
    with pytest.raises(ValueError, match="kernel='fast': pass one of 'auto', 'numpy', 'numba'"): average_to_file(files, out, kernel='fast')
    import ckpt_avg
    monkeypatch.delitem(sys.modules, 'ckpt_avg.fused', raising=False)
    monkeypatch.delattr(ckpt_avg, 'fused', raising=False)
    monkeypatch.setitem(sys.modules, 'numba', None)  # numba not installed (or failing to import)
    model = {'w': torch.zeros(10_000), 'm': torch.zeros(3, 7), 'n': torch.tensor(0)}
    with pytest.raises(ValueError, match=r"kernel='numba' needs the numba package.*pip install \"ckpt_avg\[numba\]\".*kernel='numpy'"):
        average_checkpoints(files, kernel='numba', into=model)
    with pytest.raises(ValueError, match="kernel='numba' needs"): average_to_file(files, out, kernel='numba')
    from ckpt_avg.cli import main
    assert main(['average', *map(str, files), '-o', str(out), '--kernel', 'numba']) == 1  # the message, no traceback
    assert not out.exists() and not list(tmp_path.glob('.*.tmp')) and all((v == 0).all() for v in model.values())
    # 'auto' where numba would pay but cannot load: a warning, and numpy does the work
    monkeypatch.setattr(kernels, '_NUMBA_PAYS', 1)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: object() if name == 'numba' else find_spec(name, *a))
    with pytest.warns(UserWarning, match="kernel='auto' chose numba, which is installed but could not load; averaging with numpy"):
        avg = average_checkpoints(files)
    assert torch.equal(avg['w'], average_checkpoints(files, kernel='numpy')['w'])


def test_numba_kernel_compiles_without_a_cache_folder(monkeypatch):
    "Where numba finds no writable folder for its disk cache (cache=True raises), the kernel is compiled in the process"
    numba_or_skip()
    import numba
    from ckpt_avg import fused
    real = numba.njit
    def njit(*a, **kw):
        if kw.get('cache'): raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return real(*a, **kw)
    monkeypatch.setattr(numba, 'njit', njit)
    kernel = fused._jit(fused.mean_window.py_func)
    xs = tuple(np.array([1, 2, 2**24], np.float32) + i for i in range(3))
    out = np.empty(3, np.float32)
    kernel(out, np.empty(3), xs, np.ones(3), 3.0, 2)
    assert np.array_equal(out, (sum(x.astype(np.float64) for x in xs)/3).astype(np.float32))
    assert not kernel._cache_hits and type(kernel._cache).__name__ == 'NullCache'


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_numba_kernel_matches_on_special_values_and_double_rounding_ties(tmp_path, dtype):
    """inf, -inf, NaN (either sign), -0, subnormals, the largest values, and bfloat16's float64 -> float32 -> bfloat16 tie:
    the same bits, but for NaN's payload (torch itself writes a bfloat16 NaN as 0x7FC0 or 0xFFFF, by position)"""
    numba_or_skip()
    f32 = torch.finfo(torch.float32)
    special = [float('inf'), float('-inf'), float('nan'), -float('nan'), -0.0, 1e-40, -1e-45, f32.max, -f32.max, 1.0]
    cols = [special, [1.0]*10, [2.0]*10, [0.0, 0.0, 0.0, 0.0, -0.0, 1e-40, -1e-45, f32.max, -f32.max, 2**-38]]
    g = torch.Generator().manual_seed(0)
    files = []
    for i, c in enumerate(cols):  # K = 4; element 9 of the mean: (1 + 1 + 2 + 2^-38)/4, and random scales after
        x = torch.cat([torch.tensor(c), torch.randn(5000, generator=g) * 10.0**torch.randint(-30, 30, (5000,), generator=g)])
        f = tmp_path/f's{i}.pth'
        torch.save({'w': x.to(dtype)}, f)
        files.append(f)
    tie = torch.tensor([4.0, 2**-6, 2**-38, 0.0])  # mean 1 + 2^-8 + 2^-40: a bfloat16 tie once rounded to float32
    for i, f in enumerate(files):
        sd = torch.load(f); sd['tie'] = tie[i:i+1].to(dtype).repeat(3); torch.save(sd, f)
    for w in (None, [1, 2, 3, 0.5]):
        fast, slow = average_checkpoints(files, weights=w, kernel='numba'), average_checkpoints(files, weights=w, kernel='numpy')
        for key in ('w', 'tie'):
            nan = slow[key].isnan()
            assert torch.equal(fast[key].isnan(), nan) and nan[:4].tolist() == ([False, False, True, True] if key == 'w' else [False]*3)
            bits = lambda t: t[~nan].view(torch.int16 if t.element_size() == 2 else torch.int32)
            assert torch.equal(bits(fast[key]), bits(slow[key])), (key, w, (bits(fast[key]) != bits(slow[key])).nonzero()[:5])
    assert average_checkpoints(files, kernel='numba')['tie'][0].item() == (1.0 if dtype == torch.bfloat16 else float(torch.tensor(1 + 2**-8 + 2**-40).float()))


REWRITE_SCRIPT = textwrap.dedent('''
    import sys, torch
    from ckpt_avg.core import load_state
    f, how, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == 'mmap'
    before = torch.load(f, weights_only=True)
    sd = load_state(f, mmap=True) if mmap else load_state(f)
    if how == 'truncate': open(f, 'r+b').truncate(0)
    else: torch.save({k: torch.zeros_like(v) for k, v in before.items()}, f)  # rewritten in place, same size, other bytes
    print(all(torch.equal(sd[k], before[k]) for k in before))  # reads every tensor
''')

@pytest.mark.parametrize('how', ['truncate', 'rewrite'])
def test_load_state_survives_its_file_being_rewritten_in_place(tmp_path, how):
    """`load_state` returns tensors of their own: the file can be truncated or rewritten in place (as `torch.save` or
    `learn.save` onto its name do) and they keep their values. With mmap=True the same truncation kills the process
    with SIGBUS, and a rewrite changes the tensors under the caller: the trap the default avoids (in a subprocess)"""
    import signal
    def run(mode):
        f = tmp_path/f'{mode}.pth'
        torch.save({'w': torch.randn(1<<16), 'b': torch.randn(7), 'n': torch.tensor(3)}, f)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
        return subprocess.run([sys.executable, '-c', REWRITE_SCRIPT, str(f), how, mode], env=env, capture_output=True, text=True, timeout=300)
    safe = run('copy')
    assert safe.returncode == 0 and safe.stdout.strip() == 'True', (safe.returncode, safe.stderr[-2000:])
    mapped = run('mmap')
    if how == 'truncate': assert mapped.returncode == -signal.SIGBUS, (mapped.returncode, mapped.stdout, mapped.stderr[-2000:])
    else: assert mapped.returncode == 0 and mapped.stdout.strip() == 'False', (mapped.returncode, mapped.stderr[-2000:])


def test_load_state_copies_keep_views_and_shared_storage(tmp_path):
    "The copy is made storage by storage: tensors that shared one in the file share one copy, with their offsets and strides"
    base = torch.arange(12.)
    torch.save({'a': base, 'b': base[2:8].view(2, 3), 't': base.view(3, 4).t()}, tmp_path/'v.pth')
    sd = load_state(tmp_path/'v.pth')
    ref = torch.load(tmp_path/'v.pth', weights_only=True)
    for k in ref: assert torch.equal(sd[k], ref[k]) and sd[k].stride() == ref[k].stride(), k
    assert sd['a'].untyped_storage().data_ptr() == sd['b'].untyped_storage().data_ptr() == sd['t'].untyped_storage().data_ptr()
    mapped = load_state(tmp_path/'v.pth', mmap=True)
    assert sd['a'].untyped_storage().data_ptr() != mapped['a'].untyped_storage().data_ptr()


def test_the_callers_grad_mode_is_never_changed_even_by_a_write_that_fails(tmp_path, monkeypatch):
    "The engine yields tensor by tensor: no_grad must not leak into the caller between yields, nor stay after an abandoned write"
    from ckpt_avg.core import _as_plan, _averages
    files = noisy_saves(tmp_path, torch.float32, k=3)
    tensors = _averages(*_as_plan(files, 'numpy', {}), chunk=1 << 18)
    next(tensors)
    assert torch.is_grad_enabled()  # while the average is suspended between two tensors
    def full_disk(spec, items, *args, **kwargs):
        next(iter(items)); raise OSError(28, 'No space left on device')  # after the first tensor
    monkeypatch.setattr('ckpt_avg.core.write_stream', full_disk)
    with pytest.raises(OSError, match='No space left'): average_to_file(files, tmp_path/'avg.pth')
    assert torch.is_grad_enabled()
    w = torch.zeros(2, requires_grad=True)
    (w * 2).sum().backward()  # training still works in this process
    assert w.grad is not None
