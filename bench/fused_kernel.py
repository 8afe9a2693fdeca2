"""What the fused numba kernel buys: exact averaging at the cost of a float32 accumulator, and what loading it costs.

Our engine has two exact kernels (`ckpt_avg.kernels`): numpy's, which converts each chunk of each input to float64 in a
scratch buffer and then adds (two passes), and numba's (`ckpt_avg.fused`), one compiled loop that converts, adds,
divides and rounds once. This script measures, on K in-memory fp32 tensors in one process, side by side and
alternated (no page faults or page releases dilute the arithmetic here; `avg_bench.py` measures real files):

* plain float32: `acc = x0.clone(); acc += x; acc /= K` in torch (not exact),
* numba float32: the numba kernel's loop with a float32 accumulator (not exact): the same technology, priced,
* numpy kernel and numba kernel: `ckpt_avg.kernels._average_tensor` (exact, checked against the float64 mean),

and, in fresh processes, what the numba kernel costs before its first result: with an empty kernel cache (cold,
compiling) and with the cache the first process filled (warm), each against `import torch` alone.

    python bench/fused_kernel.py                # 5 x 16 MB tensors (like 2048 x 2048 weights), 1 thread
    python bench/fused_kernel.py --mb 100 --threads 2
"""
import argparse, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np, torch
import numba
from ckpt_avg.kernels import _numba_window as real_numba_window

def numba_f32_window(weights, k, dtype=None):
    "A stand-in for `ckpt_avg.kernels._numba_window` accumulating in float32 (not exact): the same numba loop, in float32"
    return real_numba_window(weights, k, np.float32)

def inputs(mb, k):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(int(mb*1e6/4), generator=g)
    return [base + 1e-2*torch.randn(base.shape, generator=g) for _ in range(k)]

FIRST = '''
import time, numpy as np, torch
t = time.perf_counter()
from ckpt_avg import fused
x = np.zeros(8, np.float32)
fused.mean_window(x.copy(), np.zeros(8), (x,)*{k}, np.ones({k}), {k}.0, 4)
print(time.perf_counter() - t)
'''

def first_use(k):
    "Seconds from `import torch` done to the numba kernel's first result in a fresh process: cold cache, then warm"
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        run = lambda: float(subprocess.run([sys.executable, '-c', FIRST.format(k=k)], env=env, capture_output=True,
                                           text=True, check=True).stdout.split()[-1])
        return run(), statistics.median(run() for _ in range(3))

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--mb', type=float, default=16, help='MB per input tensor')
    p.add_argument('--k', type=int, default=5)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--reps', type=int, default=15)
    a = p.parse_args()
    cold, warm = first_use(a.k)
    torch.set_num_threads(a.threads)
    import ckpt_avg.kernels as kernels
    xs = inputs(a.mb, a.k)
    ref = (sum(x.double() for x in xs)/len(xs)).float()
    chunk = 1 << 18
    for kn in ('numpy', 'numba'): assert torch.equal(kernels._average_tensor(xs, None, chunk, kernel=kn), ref), kn
    def plain():
        acc = xs[0].clone()
        for x in xs[1:]: acc.add_(x)
        return acc.div_(len(xs))
    def numba_f32():
        kernels._numba_window = numba_f32_window
        try: return kernels._average_tensor(xs, None, chunk, kernel='numba')
        finally: kernels._numba_window = real_numba_window
    ways = {'plain float32': plain, 'numba float32': numba_f32,
            'numpy kernel': lambda: kernels._average_tensor(xs, None, chunk, kernel='numpy'),
            'numba kernel': lambda: kernels._average_tensor(xs, None, chunk, kernel='numba')}
    times = {n: [] for n in ways}
    for r in range(a.reps + 1):
        for n, f in (ways.items() if r % 2 else reversed(ways.items())):
            t = time.perf_counter(); f(); d = time.perf_counter() - t
            if r: times[n].append(d)
    med = statistics.median
    print(f"{a.k} x {a.mb:g} MB fp32 in memory, torch {torch.__version__}, numba {numba.__version__}, {a.threads} thread(s), "
          f"medians of {a.reps} alternated rounds")
    print(f"{'':14}{'ms':>8}{'÷ plain f32':>13}{'÷ numba f32':>13}")
    for n, v in times.items():
        print(f"{n:14}{med(v)*1e3:8.2f}{med([x/y for x, y in zip(v, times['plain float32'])]):13.2f}"
              f"{med([x/y for x, y in zip(v, times['numba float32'])]):13.2f}" + ('  (exact)' if 'kernel' in n else '  (not exact)'))
    print(f"numba kernel before its first result in a fresh process (after import torch): {cold:.2f} s with an empty "
          f"kernel cache (compiling), {warm:.2f} s with a warm one")

if __name__ == '__main__': main()
