"""Benchmark `ckpt_avg average` against a naive load-all-then-mean script, as ratios measured side by side.

Run by hand, never in CI:  python bench/avg_bench.py [--mb 100] [--k 5] [--dtype fp32|bf16] [--opt] [--cold] [--runs 5]

It writes K synthetic checkpoints (24 x [Linear w*w + LayerNorm] + BatchNorm1d, each file the base weights plus its own
noise, saved with fastai's `save_model`, with optimizer state when --opt), then runs, alternating round by round:
  torch   `python -c "import torch"`                  (the yardstick of the whole-process ratio and of net memory)
  ours    `python -m ckpt_avg.cli average FILES -o OUT`
  naive   a script that torch.load()s every file whole, stacks and means each tensor in its dtype, torch.save()s
  floor   what the machine allows such a command: `import torch`, read the weights' bytes of the K files (a `cat` of their
          byte ranges), write a new file of the model's size, fsync it and its folder (our writer syncs the same way)
  ours-*-over  the command writing over an existing output (--force), which the file system must free first
  before-*     with --before PATH: the same commands from an earlier checkout, in the same rounds (a before/after ratio)
and prints medians of the per-round ratios: whole process / `import torch` and / floor, net peak RSS / model bytes (child's
ru_maxrss minus that of `import torch`), and, in this process, the average alone / a `cat` of the model bytes
(every tensor's byte range read through a reused 1 MiB buffer), plus the share of elements equal to the correctly
rounded mean. --cold drops the page cache before each in-process run (needs root; skipped otherwise).
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time
import numpy as np
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch
from runner import Runner

NAIVE = r'''
import sys, torch
from fastcore.foundation import L
files, out = sys.argv[1:-1], sys.argv[-1]
with torch.serialization.safe_globals([L]): objs = [torch.load(f, map_location='cpu', weights_only=True) for f in files]
states = [o['model'] if 'opt' in o else o for o in objs]
res = {}
for k, v in states[-1].items():
    res[k] = torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
torch.save(res, out)
'''

FLOOR = r'''
import json, os, sys, torch
ranges, out, size = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
buf = bytearray(1 << 20); mv = memoryview(buf)
for f, rs in ranges:
    with open(f, 'rb', buffering=0) as fh:
        for off, n in rs:
            fh.seek(off)
            while n > 0: n -= fh.readinto(mv[:min(n, len(buf))])
with open(out, 'wb', buffering=0) as fh:
    while size > 0: size -= fh.write(mv[:min(size, len(buf))])
    os.fsync(fh.fileno())
d = os.open(os.path.dirname(out), os.O_RDONLY); os.fsync(d); os.close(d)
'''


def _save_with_opt(f, model, opt):
    "fastai's `save_model(with_opt=True)`, or the same structure written by hand where fastai is not installed"
    if opt is None: return torch.save(model.state_dict(), f)
    try:
        from fastai.learner import save_model
        return save_model(f, model, opt, with_opt=True)
    except ImportError: torch.save({'model': model.state_dict(), 'opt': opt}, f)


def make_set(folder, mb, k, dtype, with_opt):
    "K checkpoints of about `mb` MB of weights each; returns the files and the model's bytes"
    w = max(8, int((mb*1e6/2/(24 if dtype == torch.bfloat16 else 48))**0.5))  # 24 w^2 parameters
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(w, w), torch.nn.LayerNorm(w)) for _ in range(24)],
                                torch.nn.BatchNorm1d(w)).to(dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    opt = None
    if with_opt:
        try:
            from fastai.optimizer import Adam
            opt = Adam(model.parameters(), lr=1e-3)
            model(torch.randn(4, w, dtype=dtype)).float().sum().backward(); opt.step()
        except ImportError:  # fastai's Adam state: per parameter grad_avg, sqr_avg and step; hypers in an L
            from fastcore.foundation import L
            opt = {'state': [{'grad_avg': torch.randn_like(p), 'sqr_avg': torch.rand_like(p), 'step': 1} for p in model.parameters()],
                   'hypers': L([{'lr': 1e-3, 'mom': 0.9, 'sqr_mom': 0.99, 'eps': 1e-5, 'wd': 0.01}])}
    files = []
    for i in range(k):
        with torch.no_grad():
            for n, p in model.state_dict().items():
                if p.is_floating_point(): p.copy_(base[n] + torch.randn_like(p)*1e-2)
                else: p.fill_(100*(i+1))
        files.append(folder/f'ckpt_{i:02d}.pth')
        _save_with_opt(files[-1], model, opt)
    return files, sum(v.numel()*v.element_size() for v in model.state_dict().values())


def drop_caches():
    try:
        os.sync()
        with open('/proc/sys/vm/drop_caches', 'w') as f: f.write('3')
        return True
    except OSError: return False


def weight_ranges(files)->list:
    "(file, [(offset, bytes) of each tensor]) for every file: where the model's bytes lie"
    from ckpt_avg.formats import read_checkpoint
    ranges = []
    for f in files:
        ck = read_checkpoint(f)
        ranges.append((str(f), sorted((t.data_ptr() - ck.mapping.lo, t.numel()*t.element_size()) for t in ck.state.values())))
        del ck
    return ranges


def cat_model_bytes(files):
    "Read every tensor's bytes of the model, as `cat` would: through one reused 1 MiB buffer"
    ranges = weight_ranges(files)
    buf = bytearray(1 << 20); mv = memoryview(buf)
    t = time.perf_counter()
    for f, rs in ranges:
        with open(f, 'rb', buffering=0) as fh:
            for off, n in rs:
                fh.seek(off)
                while n > 0: n -= fh.readinto(mv[:min(n, len(buf))])
    return time.perf_counter() - t


def correct_share(out, files, dtype):
    "Share of float elements of `out` equal to the float64 mean of the inputs rounded to `dtype`"
    from ckpt_avg.formats import read_checkpoint
    res = read_checkpoint(out).state
    states = [read_checkpoint(f).state for f in files]
    good = total = 0
    for k, v in res.items():
        if not v.is_floating_point(): continue
        ref = (sum(s[k].double() for s in states)/len(states)).to(v.dtype)
        good += (v == ref).sum().item(); total += v.numel()
    return good/total


def med(xs): return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--mb', type=float, default=25, help='MB of weights per file (100, 400, 1200 for the issue sizes)')
    ap.add_argument('--k', type=int, default=5)
    ap.add_argument('--dtype', choices=['fp32', 'bf16'], default='fp32')
    ap.add_argument('--opt', action='store_true', help='fastai files with optimizer state (3x the weights on disk)')
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--cold', action='store_true', help='drop the page cache before each in-process run (root only)')
    ap.add_argument('--dir', type=Path, help='where to write the checkpoints (default: a temporary folder, removed at the end)')
    ap.add_argument('--kernels', default='numpy,numba' if find_spec('numba') else 'numpy',
                    help="the engine's kernels to time side by side, comma-separated (auto, numpy, numba; see ckpt_avg.kernels; "
                         "default: numpy, and numba where it is installed)")
    ap.add_argument('--no-naive', action='store_true', help='skip the naive baseline (it needs K+1 models of memory)')
    ap.add_argument('--before', type=Path, help='a checkout of an earlier ckpt_avg (e.g. `git worktree add /tmp/before HEAD~3`): '
                    'its command runs in the same rounds as `before-*`, for a before/after ratio measured side by side')
    a = ap.parse_args()
    kernels = a.kernels.split(',')
    run = Runner()
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[a.dtype]
    folder = Path(a.dir or tempfile.mkdtemp(prefix='avg_bench_'))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        files, model_bytes = make_set(folder, a.mb, a.k, dtype, a.opt)
        disk = sum(f.stat().st_size for f in files)
        print(f"{a.k} x {model_bytes/1e6:.0f} MB of {a.dtype} weights{' + optimizer state' if a.opt else ''} "
              f"({disk/1e9:.2f} GB on disk), written in {time.perf_counter()-t:.0f} s; torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, kernels {a.kernels}")
        py = sys.executable
        (folder/'ranges.json').write_text(json.dumps(weight_ranges(files)))
        cmds = dict(torch=[py, '-c', 'import torch'], floor=[py, '-c', FLOOR, str(folder/'ranges.json'), str(folder/'floor.pth'), str(model_bytes)])
        average = lambda name, kn: [py, '-m', 'ckpt_avg.cli', 'average', *map(str, files), '-o', str(folder/f'{name}.pth'), '-q', '--force', '--kernel', kn]
        for kn in kernels: cmds[f'ours-{kn}'], cmds[f'ours-{kn}-over'] = average(f'ours-{kn}', kn), average(f'ours-{kn}-over', kn)
        if a.before:  # the same command from another checkout: its package first on the path
            run_before = f"import runpy, sys; sys.path.insert(0, {str(a.before.resolve())!r}); runpy.run_module('ckpt_avg.cli', run_name='__main__')"
            for kn in kernels:
                for n in (f'before-{kn}', f'before-{kn}-over'): cmds[n] = [py, '-c', run_before, *average(n, kn)[3:]]
        if not a.no_naive: cmds['naive'] = [py, '-c', NAIVE, *map(str, files), str(folder/'naive.pth')]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path[1:]))
        res = {n: [] for n in cmds}
        for r in range(a.runs + 1):  # round 0 warms the page cache (and writes each -over output once) and is not counted
            for n, c in (cmds.items() if r % 2 else reversed(cmds.items())):
                if not n.endswith('-over'): (folder/f'{n}.pth').unlink(missing_ok=True)  # a new file, as a first average writes
                os.sync()  # untimed: the writeback of the previous command is not this one's
                m = run(c, env)[:2]
                if r: res[n].append(m)
        tt, ft = [w for w, _ in res['torch']], [w for w, _ in res['floor']]
        print(f"\nwhole process, warm, median of {a.runs} alternated rounds (python -c 'import torch': {med(tt):.2f} s, "
              f"peak {med([p for _, p in res['torch']])/2**20:.0f} MiB; floor: {med(ft):.2f} s, "
              f"{med([f/t for f, t in zip(ft, tt)]):.2f} x import torch)")
        print(f"{'':18}{'wall s':>8}{'÷ import torch':>16}{'÷ floor':>10}{'net peak ÷ model':>18}")
        for n in cmds:
            if n == 'torch': continue
            ratio, floor = med([w/t for (w, _), t in zip(res[n], tt)]), med([w/f for (w, _), f in zip(res[n], ft)])
            net = med([(p - pt)/model_bytes for (_, p), (_, pt) in zip(res[n], res['torch'])])
            print(f"{n:18}{med([w for w, _ in res[n]]):8.2f}{ratio:16.2f}{floor:10.2f}{net:18.2f}")

        # in this process: the average alone against reading the model's bytes, alternated
        from ckpt_avg.core import average_checkpoints
        cold = a.cold and drop_caches()
        if a.cold and not cold: print("\n--cold: cannot drop the page cache here (needs root); in-process figures are warm")
        def naive_avg():
            st = [(lambda o: o['model'] if 'opt' in o else o)(torch.load(f, weights_only=False)) for f in files]
            return {k: torch.stack([s[k] for s in st]).mean(0) if v.is_floating_point() else v for k, v in st[-1].items()}
        import ckpt_avg.kernels as kernel_mod  # `kernels` here names the kernels to time
        def fp32_acc():
            kernel_mod._ACC = torch.float32
            try: return average_checkpoints(files, kernel='numpy')  # the numpy kernel: the one _ACC changes
            finally: kernel_mod._ACC = torch.float64
        def plain_fp32():
            "The plain float32 accumulator: whole tensors, `acc += x` for each input, then `acc /= K`, on the same mapped files"
            from ckpt_avg.formats import read_checkpoint
            states = [read_checkpoint(f).state for f in files]
            res = {}
            for key, t in states[0].items():
                if not t.is_floating_point(): res[key] = states[-1][key]; continue
                acc = t.to(torch.float32, copy=True)
                for s in states[1:]: acc.add_(s[key])
                res[key] = acc.div_(len(states)).to(t.dtype)
            return res
        def fp32_acc_numba():
            "our engine with the numba kernel's loop accumulating in float32 (bench/fused_kernel.py): not exact"
            from fused_kernel import numba_f32_window
            real = kernel_mod._numba_window
            kernel_mod._numba_window = numba_f32_window
            try: return average_checkpoints(files, kernel='numba')
            finally: kernel_mod._numba_window = real
        ours = {f'ours-{kn}': (lambda kn=kn: average_checkpoints(files, kernel=kn)) for kn in kernels}
        yard = dict(fp32acc=fp32_acc, **({'fp32acc-numba': fp32_acc_numba} if 'numba' in kernels else {}))
        ways = dict(cat=lambda: cat_model_bytes(files), **ours, **yard, plain32=plain_fp32, naive=naive_avg)
        ins = {n: [] for n in ways}
        for r in range(a.runs + 1):  # round 0 loads what each way loads (numba's kernels) and is not counted
            for n, f in (ways.items() if r % 2 else reversed(ways.items())):
                if n == 'naive' and a.no_naive: continue
                if cold: drop_caches()
                t = time.perf_counter(); x = f(); d = time.perf_counter() - t
                if n == 'cat': d = x
                del x
                if r: ins[n].append(d)
        print(f"\nin-process, {'cold' if cold else 'warm'} (cat of the model bytes: {med(ins['cat'])*1e3:.0f} ms)")
        print("price of exactness: each exact kernel's time ÷ that of a float32 accumulator (not exact), medians of paired ratios")
        print(f"  {'':12}{'plain acc += x':>16}" + ''.join(f"{dict(fp32acc='numpy f32', **{'fp32acc-numba': 'numba f32'})[n]:>16}" for n in yard))
        print(f"  {'(ms)':12}{med(ins['plain32'])*1e3:16.0f}" + ''.join(f"{med(ins[n])*1e3:16.0f}" for n in yard))
        for n in ours:
            print(f"  {n:12}{med([x/y for x, y in zip(ins[n], ins['plain32'])]):16.2f}"
                  + ''.join(f"{med([x/y for x, y in zip(ins[n], ins[m])]):16.2f}" for m in yard))
        print("  (plain: whole tensors, acc += x, acc /= K, on the same mapped files, no pages given back; engine: our streaming "
              "engine with a float32 scratch, numpy's two passes or numba's one)")
        for n in (*ours, 'naive'):
            if not ins[n]: continue
            print(f"{n:12}{med(ins[n])*1e3:8.0f} ms{med([x/c for x, c in zip(ins[n], ins['cat'])]):8.2f} x cat")
        from ckpt_avg.formats import read_checkpoint
        from fastcore.foundation import L
        meta = {'ours (read_checkpoint)': [], 'torch.load(mmap=True, weights_only=True)': []}
        for r in range(a.runs):
            for f in files:
                t = time.perf_counter(); read_checkpoint(f); meta['ours (read_checkpoint)'].append(time.perf_counter() - t)
                with torch.serialization.safe_globals([L]):
                    t = time.perf_counter(); torch.load(f, mmap=True, weights_only=True)
                    meta['torch.load(mmap=True, weights_only=True)'].append(time.perf_counter() - t)
        print("\nper-file metadata (open a file, map its weights)")
        for n, v in meta.items(): print(f"{med(v)*1e3:8.1f} ms  {n}")
        print("\ncorrectly rounded float elements (share equal to the float64 mean rounded once to the dtype)")
        for n in cmds:
            if n not in ('torch', 'floor'): print(f"{n:16}{100*correct_share(folder/f'{n}.pth', files, dtype):8.2f} %")
    finally:
        if a.dir is None: shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__': main()
