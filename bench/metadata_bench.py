"""Per-file metadata time: what `read_checkpoint` costs before the first byte of a weight is read, against torch.load.

    OMP_NUM_THREADS=1 python bench/metadata_bench.py [--reps 30] [--before fb93001]

Files: fastai's `learn.save(with_opt=True)` of the digits demo after one epoch (SGD with momentum), and a larger
fastai file (24 x [Linear 256x256 + LayerNorm], Adam state after one step: 96 weights, ~200 optimizer tensors).
Modes, each run once per repetition in a rotated order (paired, alternated), medians of the per-repetition ratios to
`torch.load(mmap=True, weights_only=True)` (the reference reader, mapped, so it reads no tensor bytes either):

- `read_checkpoint`: ours, hardened (pre-scan, zip and record checks, our unpickler, lazy tensors of the weights only)
- `torch.load + checks`: the alternative of reading through torch.load(mmap=True) after the same pre-scan and zip
  checks, plus the layout check of each weight (what the torch.load fallback does)
- `pre-scan only`: `_scan_pickle` on the file's data.pkl
- `read_checkpoint before`: the reader of git revision `--before` (no checks), if given
Page cache warm, no tensor data touched by any mode.
"""
import argparse, importlib.util, os, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path
import torch
warnings.simplefilter('ignore')
from ckpt_avg import formats
from ckpt_avg.formats import read_checkpoint


def digits_file(d):
    from ckpt_avg.demo import digits_learner
    learn = digits_learner(path=d)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1)
    return learn.save('digits', with_opt=True)


def large_file(d):
    from fastai.learner import save_model
    from fastai.optimizer import Adam
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(24) for m in (torch.nn.Linear(256, 256), torch.nn.LayerNorm(256))])
    opt = Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 256)).sum().backward(); opt.step()
    f = Path(d)/'large.pth'
    save_model(f, model, opt, with_opt=True)
    return f


def torch_load_checked(f):
    "The alternative design: our pre-scan and zip checks, then torch.load(mmap=True) and the layout check of each weight"
    mapping = formats._Mapping(f)
    records = formats._zip_records(f, mapping.mm, mapping.size)
    start, n = records[formats._root(records) + 'data.pkl']
    formats._scan_pickle(bytes(mapping.mm[start:start+n]), mapping.size)
    obj = formats._torch_load(f, True)
    return {k: formats._checked(v) for k, v in obj['model'].items()}


def scan_only(f):
    mapping = formats._Mapping(f)
    records = formats._zip_records(f, mapping.mm, mapping.size)
    start, n = records[formats._root(records) + 'data.pkl']
    formats._scan_pickle(bytes(mapping.mm[start:start+n]), mapping.size)


def before_reader(rev):
    "`read_checkpoint` of git revision `rev`, imported next to today's modules"
    src = subprocess.run(['git', 'show', f'{rev}:ckpt_avg/formats.py'], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    path = Path(tempfile.mkdtemp())/'formats_before.py'
    path.write_text(src)
    spec = importlib.util.spec_from_file_location('ckpt_avg._formats_before', path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod.read_checkpoint


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--reps', type=int, default=30)
    p.add_argument('--before', default=None, help='git revision of the reader to compare with (e.g. fb93001)')
    a = p.parse_args()
    d = tempfile.mkdtemp()
    modes = {'torch.load(mmap=True)': lambda f: formats._torch_load(f, True), 'read_checkpoint': read_checkpoint,
             'torch.load + checks': torch_load_checked, 'pre-scan only': scan_only}
    if a.before: modes[f'read_checkpoint {a.before}'] = before_reader(a.before)
    print(f"torch {torch.__version__}, {a.reps} alternated repetitions, medians; ratio = time / torch.load(mmap=True)'s")
    for f in (digits_file(d), large_file(d)):
        for fn in modes.values(): fn(f)  # warm-up: page cache, imports
        times = {m: [] for m in modes}
        for r in range(a.reps):
            names = list(modes)[r % len(modes):] + list(modes)[:r % len(modes)]
            for m in names:
                t = time.perf_counter(); modes[m](f); times[m].append(time.perf_counter() - t)
        base = times['torch.load(mmap=True)']
        print(f"\n{Path(f).name}: {os.path.getsize(f)/1e3:.0f} kB")
        for m in modes:
            ratio = statistics.median(t/b for t, b in zip(times[m], base))
            print(f"  {m:30} {statistics.median(times[m])*1e3:7.2f} ms  {ratio:5.2f}x")


if __name__ == '__main__': main()
