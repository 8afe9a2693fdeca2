"Averaging on a device (`device='cuda'`): the same pipeline run on the CPU here, the real CUDA path where a GPU is present"
import os, subprocess, sys
from pathlib import Path
import pytest, torch
from ckpt_avg import kernels
from ckpt_avg.core import average_checkpoints, average_to_file
from ckpt_avg.formats import write_checkpoint
from ckpt_avg.kernels import _DeviceAverage, _average_tensor, check_device
from ckpt_avg.cli import main

ROOT = Path(__file__).parents[1]
CPU = torch.device('cpu')
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU: torch.cuda.is_available() is False')
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture
def staged(monkeypatch):
    "device='cpu' runs the device pipeline on the CPU (no pinning, no stream, no events), in windows of 1000 elements"
    monkeypatch.setattr(kernels, '_STAGE_ON_CPU', True)
    monkeypatch.setattr(kernels, '_DEVICE_WINDOW', 1000)


def saves(folder, dtype, k=5, n=4321):
    "k files of a model with a tensor of several windows, a matrix, a scalar, an empty tensor, a view, an integer buffer"
    torch.manual_seed(0)
    base, files = torch.randn(n), []
    for i in range(k):
        big = torch.randn(60, 50).to(dtype)
        state = {'w': (base + torch.randn(n)*1e-2).to(dtype), 'm': torch.randn(3, 7).to(dtype), 's': torch.randn(()).to(dtype),
                 'e': torch.empty(0, 3, dtype=dtype), 'v': big.t()[::2], 'n': torch.tensor(i)}
        files.append(folder/f'c{i}.pth')
        torch.save(state, files[-1])
    return files


def same(a, b): return a.keys() == b.keys() and all(x.dtype == b[k].dtype and x.shape == b[k].shape and torch.equal(x, b[k]) for k, x in a.items())


@pytest.mark.parametrize('dtype', FLOATS)
@pytest.mark.parametrize('weights', [None, [1., 2., 3., 5., 7.]])
def test_the_pipeline_gives_the_cpu_engines_bits(tmp_path, staged, dtype, weights):
    files = saves(tmp_path, dtype)
    ref = average_checkpoints(files, weights=weights, kernel='numpy')
    got = average_checkpoints(files, weights=weights, device='cpu')  # staged, 5 windows for 'w'
    assert same(got, ref)
    assert got['n'].item() == 4 and got['n'].dtype == torch.int64  # integers: the newest file's


@pytest.mark.parametrize('k', [2, 3, 6, 7])
def test_every_k_divides_as_the_cpu_engine_does(tmp_path, staged, k):
    "a division by K, not a multiplication by 1/K: for K=3, 6, 7 the two differ in the last bit of some elements"
    torch.manual_seed(k)
    xs = [torch.randn(20_000, dtype=torch.float64) for _ in range(k)]
    assert torch.equal(_DeviceAverage(CPU, None, k, window=4096)(xs), _average_tensor(xs, None, 1 << 12))


def test_complex_and_tensors_larger_than_a_window_in_a_state(tmp_path, staged):
    torch.manual_seed(0)
    xs = [torch.randn(2500, dtype=torch.complex64) for _ in range(3)]
    for weights in (None, [0.2, 0.3, 0.5]):
        assert torch.equal(_DeviceAverage(CPU, weights, 3, window=1000)(xs), _average_tensor(xs, weights, 256))


def test_buffers_are_made_once_and_reused(tmp_path, staged):
    average = _DeviceAverage(CPU, None, 3, window=100)
    xs = [torch.randn(250) for _ in range(3)]
    average(xs)
    before = {k: b.data_ptr() for k, b in average.buffers.items()}
    average([x[:50] for x in xs]); average(xs)
    assert {k: b.data_ptr() for k, b in average.buffers.items()} == before and len(before) == 7
    assert all(b.numel() == 100 for b in average.buffers.values())  # bounded by the window, whatever the tensor


@pytest.mark.parametrize('fmt', ['state_dict', 'safetensors'])
def test_average_to_file_writes_the_same_bytes(tmp_path, staged, fmt):
    files = saves(tmp_path, torch.bfloat16)
    files = [f for f in files]
    a = average_to_file(files, tmp_path/f'cpu.{fmt}', fmt, kernel='numpy')
    b = average_to_file(files, tmp_path/f'dev.{fmt}', fmt, device='cpu')
    assert a['hash'] == b['hash'] and (tmp_path/f'cpu.{fmt}').read_bytes() == (tmp_path/f'dev.{fmt}').read_bytes()


def test_into_a_live_state_dict(tmp_path, staged):
    files = saves(tmp_path, torch.float32, k=3)
    ref = average_checkpoints(files)
    into = {k: torch.zeros_like(v) for k, v in ref.items()}
    assert average_checkpoints(files, into=into, device='cpu') is into and same(into, ref)


def test_device_errors_come_before_anything_is_read(tmp_path, monkeypatch):
    missing = tmp_path/'missing.pth'  # never read: the device is refused first
    for device, why in (('tpu', "averaging runs on 'cpu' (the default) or a CUDA GPU"), ('cuda:x', "averaging runs on 'cpu'"),
                        ('meta', "averaging runs on 'cpu'"), (3.5, "averaging runs on 'cpu'")):
        with pytest.raises(ValueError, match=r"averaging runs on 'cpu'"): average_checkpoints([missing], device=device)
    with pytest.raises(ValueError, match="kernel='numba' is a CPU kernel"): average_to_file([missing], tmp_path/'o.pth', device='cuda', kernel='numba')
    with pytest.raises(ValueError, match="kernel='numpy' is a CPU kernel"): average_checkpoints([missing], device='cuda:0', kernel='numpy')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ValueError, match=r"torch sees no CUDA GPU here \(torch.cuda.is_available\(\) is False\); leave device='cpu', the default"):
        average_to_file([missing], tmp_path/'o.pth', device='cuda')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(ValueError, match="this machine has 2 CUDA GPUs: pass 'cuda:0' to 'cuda:1'"): average_checkpoints([missing], device='cuda:2')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(ValueError, match="has 1 CUDA GPU: pass 'cuda:0'$"): check_device(torch.device('cuda', 1))
    assert not (tmp_path/'o.pth').exists()


def test_cpu_is_todays_engine(tmp_path):
    assert check_device('cpu') is None and check_device(None) is None and check_device(torch.device('cpu')) is None
    files = saves(tmp_path, torch.float32, k=3)
    assert same(average_checkpoints(files, device='cpu'), average_checkpoints(files))


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'ckpt_avg.cli', *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_cli_device_is_checked_as_the_function_checks_it(tmp_path):
    files = saves(tmp_path, torch.float32, k=2)
    r = cli('average', *files, '-o', tmp_path/'a.pth', '--device', 'tpu')
    assert r.returncode == 2 and "--device tpu: device='tpu': averaging runs on 'cpu'" in r.stderr, r.stderr
    r = cli('average', *files, '--dry-run', '--device', 'cuda', '--kernel', 'numba')
    assert r.returncode == 2 and "kernel='numba' is a CPU kernel" in r.stderr, r.stderr
    if not torch.cuda.is_available():
        r = cli('average', *files, '-o', tmp_path/'a.pth', '--device', 'cuda')
        assert r.returncode == 2 and 'torch sees no CUDA GPU here' in r.stderr, r.stderr
    assert not (tmp_path/'a.pth').exists()
    r = cli('average', *files, '-o', tmp_path/'a.pth', '--device', 'cpu')
    assert r.returncode == 0 and same(torch.load(tmp_path/'a.pth'), average_checkpoints(files)), r.stderr


def test_cli_passes_the_device_on(tmp_path, monkeypatch):
    "in-process, with the pipeline staged on the CPU: `--device` reaches `average_to_file`"
    monkeypatch.setattr(kernels, '_STAGE_ON_CPU', True)
    calls = []
    real = kernels._DeviceAverage.__call__
    monkeypatch.setattr(kernels._DeviceAverage, '__call__', lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    files = saves(tmp_path, torch.float32, k=2)
    assert main(['average', *map(str, files), '-o', str(tmp_path/'a.pth'), '--device', 'cpu', '-q']) == 0
    assert calls and same(torch.load(tmp_path/'a.pth'), average_checkpoints(files, kernel='numpy'))


@cuda_only
@pytest.mark.parametrize('dtype', FLOATS)
@pytest.mark.parametrize('weights', [None, [1., 2., 3., 5., 7.]])
def test_cuda_gives_the_cpu_engines_bits(tmp_path, monkeypatch, dtype, weights):
    monkeypatch.setattr(kernels, '_DEVICE_WINDOW', 1000)  # several windows per tensor
    files = saves(tmp_path, dtype)
    ref = average_checkpoints(files, weights=weights, kernel='numpy')
    got = average_checkpoints(files, weights=weights, device='cuda')
    assert same(got, ref) and all(t.device.type == 'cpu' for t in got.values())
    a = average_to_file(files, tmp_path/'cpu.pth', kernel='numpy', weights=weights)
    assert average_to_file(files, tmp_path/'gpu.pth', device='cuda', weights=weights)['hash'] == a['hash']


@cuda_only
@pytest.mark.parametrize('k', [3, 7])
def test_cuda_divides_by_k_not_by_its_reciprocal(k):
    torch.manual_seed(k)
    xs = [torch.randn(100_000, dtype=torch.float64) for _ in range(k)]
    assert torch.equal(_DeviceAverage(torch.device('cuda'), None, k)(xs), _average_tensor(xs, None, 1 << 14))


@cuda_only
def test_cuda_staging_is_pinned_and_device_memory_bounded():
    dev = torch.device('cuda')
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    average = _DeviceAverage(dev, None, 3, window=1 << 16)
    xs = [torch.randn(1 << 22) for _ in range(3)]  # 16 MB each, 64 windows
    assert torch.equal(average(xs), _average_tensor(xs, None, 1 << 18))
    host = [b for (role, _), b in average.buffers.items() if role.startswith(('stage', 'back'))]
    assert len(host) == 3 and all(b.is_pinned() for b in host)
    assert all(b.device.type == 'cuda' for (role, _), b in average.buffers.items() if not role.startswith(('stage', 'back')))
    # acc and tmp in float64, raw and res in float32, and the divisor: a few windows, not a 16 MB tensor
    assert torch.cuda.max_memory_allocated(dev) - before <= (2*8 + 2*4) * (1 << 16) + (1 << 20)
