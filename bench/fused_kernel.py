"""Could exact averaging cost no more than a float32 accumulator? A fused kernel compiled by `torch.compile`, measured.

Our engine (`ckpt_avg.core`) converts each chunk of each input to float64 in a scratch buffer, then adds: two passes
where a float32 accumulator makes one. A single compiled loop that reads K inputs, converts, adds, divides and rounds
once would make one pass too. torch's inductor can generate it on a CPU, if a C++ compiler is installed. This script
measures, on K in-memory fp32 tensors in one process, side by side and alternated:

* the plain float32 accumulator (`acc = x0.clone(); acc += x; acc /= K`: not exact),
* our engine (`_average_tensor`: exact),
* the compiled fused kernel (exact: it is checked against the float64 mean),

and, in two fresh processes, what the compiled kernel costs before its first result: compiling with an empty
inductor cache (cold), then with the cache the first process filled (warm).

    python bench/fused_kernel.py                # 5 x 16 MB tensors (like 2048 x 2048 weights), 1 thread
    python bench/fused_kernel.py --mb 400 --threads 2
"""
import argparse, os, statistics, subprocess, sys, tempfile, time, json
import torch

def mean_exact(*xs):
    "The float64 mean of `xs` rounded once to their dtype: inductor fuses this into one loop"
    acc = xs[0].double()
    for x in xs[1:]: acc = acc + x.double()
    return (acc / len(xs)).to(xs[0].dtype)

def inputs(mb, k):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(int(mb*1e6/4), generator=g)
    return [base + 1e-2*torch.randn(base.shape, generator=g) for _ in range(k)]

def child(a):
    "Compile and run once in this fresh process; print the seconds that took, as JSON"
    torch.set_num_threads(a.threads)
    xs = inputs(a.mb, a.k)
    t = time.perf_counter()
    out = torch.compile(mean_exact, dynamic=True)(*xs)
    print(json.dumps(time.perf_counter() - t))

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--mb', type=float, default=16, help='MB per input tensor')
    p.add_argument('--k', type=int, default=5)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--reps', type=int, default=15)
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child: return child(a)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        cmd = [sys.executable, __file__, '--child', '--mb', str(a.mb), '--k', str(a.k), '--threads', str(a.threads)]
        first = {n: json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                 for n in ('cold', 'warm')}
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache
        from ckpt_avg.core import _average_tensor
        xs = inputs(a.mb, a.k)
        fused = torch.compile(mean_exact, dynamic=True)
        ref = (sum(x.double() for x in xs)/len(xs)).float()
        assert torch.equal(fused(*xs), ref) and torch.equal(_average_tensor(xs, None, 1<<18), ref)
        def plain():
            acc = xs[0].clone()
            for x in xs[1:]: acc.add_(x)
            return acc.div_(len(xs))
        ways = dict(plain=plain, ours=lambda: _average_tensor(xs, None, 1<<18), fused=lambda: fused(*xs))
        times = {n: [] for n in ways}
        for r in range(a.reps + 1):
            for n, f in (ways.items() if r % 2 else reversed(ways.items())):
                t = time.perf_counter(); f(); d = time.perf_counter() - t
                if r: times[n].append(d)
    med = statistics.median
    print(f"{a.k} x {a.mb:g} MB fp32 in memory, torch {torch.__version__}, {a.threads} thread(s), medians of {a.reps} alternated rounds")
    for n, v in times.items():
        print(f"{n:6} {med(v)*1e3:8.2f} ms  ÷ plain float32 {med([x/y for x, y in zip(v, times['plain'])]):5.2f}"
              + ('  (not exact)' if n == 'plain' else '  (exact)'))
    print(f"compiled kernel before its first result, in a fresh process: {first['cold']:.1f} s with an empty inductor "
          f"cache, {first['warm']:.1f} s with a warm one")

if __name__ == '__main__': main()
