"""What a checkpoint costs the training loop: fastai's SaveModelCallback, SaveEvery synchronous, SaveEvery in the background.

For a model of about 100 MB and one of about 400 MB (fp32 MLPs, fastai Adam, real `learn.fit` on synthetic data), each
run trains the same seeded model for `epochs` epochs with one save per epoch, in four modes run in rotation
(none, fastai, sync, background), `reps` times. The last epoch has no save: in a long run a background write
overlaps the training that follows it, and only the fit's last save is waited for at its end (once per fit, like
a synchronous save), so the per-save cost is measured away from that end. Between runs, untimed, the checkpoints are
deleted and `os.sync()` is called: without it a run paid for the writeback and the ext4 discards of the run before
(on the 2-core VM a 403 MB synchronous save blocked 845 ms after another mode's run, 90 ms from a quiet disk). It prints, per size and mode, medians over the paired runs of:

* blocked / memcpy: time the training thread spends inside the save call, per save, divided by the time of one copy
  of the state into memory already allocated (on CUDA: device-to-host into pinned memory, synchronised), taken by a
  fifth mode, `memcpy`, at the same points of the same kind of fit (a copy timed alone, outside training, is printed
  too: it varied 1.5x between runs);
* lost / save: (wall time of the fit with saves - wall time of the paired fit without) / saves, also as a ratio to
  the memcpy and to our synchronous save (CRC32 off).

Durability: every file is fsynced (the file, then its folder) before it gets its name and is recorded. The modes
`sync-nofsync` and `background-nofsync` are the same saves with both fsyncs turned off (patched out for that run
only), run in the same rotation, so the cost of durability per save is printed side by side: the medians of
blocked and lost per save with and without, their difference, and the median of the paired ratios.

    python bench/save_bench.py                       # CPU, both sizes
    python bench/save_bench.py --device cuda --reps 5
    python bench/save_bench.py --sizes 100 --modes none,sync,sync-nofsync,background,background-nofsync
"""
import argparse, contextlib, os, shutil, statistics, tempfile, time
from pathlib import Path
import torch
from torch import nn
from fastai.basics import Learner, DataLoaders, set_seed, Adam
from fastai.data.load import DataLoader
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from ckpt_avg.save import SaveEvery
import ckpt_avg.files as files

def model_of(width, depth):
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()) for _ in range(depth)],
                         nn.Linear(width, 10))

class Data(torch.utils.data.Dataset):
    def __init__(self, n, width): g = torch.Generator().manual_seed(0); self.x, self.y = torch.randn(n, width, generator=g), torch.randint(0, 10, (n,), generator=g)
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]

def learner(width, depth, bs, n_batches, device, path):
    set_seed(0)
    dls = DataLoaders(DataLoader(Data(bs*n_batches, width), bs=bs, shuffle=True, drop_last=True),
                      DataLoader(Data(bs, width), bs=bs), device=device)
    return Learner(dls, model_of(width, depth).to(device), loss_func=nn.CrossEntropyLoss(), opt_func=Adam, path=path)

def timed(cls, meth):
    "A subclass of callback `cls` whose method `meth` records its duration in `self.blocked`"
    def wrapper(self, *a, **kw):
        if self.epoch == self.n_epoch - 1: return  # no save at the very end: see the module's docstring
        t = time.perf_counter()
        try: return getattr(cls, meth)(self, *a, **kw)
        finally: self.blocked.append(time.perf_counter() - t)  # the training thread's time; queued GPU work shows in `lost`
    def before_fit(self): self.blocked = []; cls.before_fit(self)
    return type(cls.__name__+'Timed', (cls,), {meth: wrapper, 'before_fit': before_fit})

def _tensors(o):
    "Every tensor in a nested state (dicts, lists, fastcore's L)"
    if isinstance(o, torch.Tensor): yield o
    elif isinstance(o, dict):
        for v in o.values(): yield from _tensors(v)
    elif isinstance(o, (list, tuple)) or type(o).__name__ == 'L':
        for v in o: yield from _tensors(v)

class Memcpy(Callback):
    "The yardstick, taken in the same fit as the saves: copy what a save writes into CPU buffers kept from copy to copy"
    def __init__(self, with_opt): self.with_opt, self.bufs = with_opt, None
    def before_fit(self): pass
    def after_epoch(self): self._save()
    def _save(self):
        state = self.learn.model.state_dict()
        if self.with_opt: state = {'model': state, 'opt': self.learn.opt.state_dict()}
        ts = list(_tensors(state))
        if self.bufs is None: self.bufs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in ts]
        for b, t in zip(self.bufs, ts): b.copy_(t, non_blocking=t.is_cuda)
        sync(self.learn.dls.device)  # the copies have landed, as `memcpy_time` waits for them

FastaiSave = timed(SaveModelCallback, '_save')
OurSave = timed(SaveEvery, '_save')
MemcpyTimed = timed(Memcpy, '_save')

def callbacks(mode, with_opt):
    if mode == 'none': return []
    if mode == 'memcpy': return [MemcpyTimed(with_opt)]
    if mode == 'fastai': cb = FastaiSave(every_epoch=1, with_opt=with_opt)
    else: cb = OurSave(epochs=1, with_opt=with_opt, background=mode.startswith('background'))
    return [cb]

class no_fsync:
    "Within this block, `atomic_write` skips its two fsyncs (the file's and its folder's)"
    def __enter__(self):
        self.saved = files._fsync_file, files._fsync_folder
        files._fsync_file, files._fsync_folder = (lambda f: f.flush()), (lambda folder: None)
    def __exit__(self, *exc): files._fsync_file, files._fsync_folder = self.saved

def sync(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()

def run(size, mode, a):
    width, depth, bs, n_batches = size
    path = Path(tempfile.mkdtemp(prefix='save_bench_', dir=a.dir))
    try:
        learn = learner(width, depth, bs, n_batches, a.device, path)
        cbs = callbacks(mode, a.with_opt)
        sync(a.device); t = time.perf_counter()
        with learn.no_bar(), learn.no_logging(), (no_fsync() if mode.endswith('-nofsync') else contextlib.nullcontext()):
            learn.fit(a.epochs, 1e-4, cbs=cbs)
        sync(a.device); wall = time.perf_counter() - t
        return wall, (cbs[0].blocked if cbs else [])
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()  # untimed: every run starts with no dirty pages, journal commits or discards left by the run before

def memcpy_time(size, device, n=7):
    "Median time of copying the model's state into preallocated buffers (pinned, synchronised, on CUDA)"
    width, depth, *_ = size
    sd = model_of(width, depth).to(device).state_dict()
    cuda = torch.device(device).type == 'cuda'
    bufs = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=cuda) for k, v in sd.items()}
    ts = []
    for _ in range(n):
        sync(device); t = time.perf_counter()
        for k, v in sd.items(): bufs[k].copy_(v, non_blocking=cuda)
        sync(device); ts.append(time.perf_counter() - t)
    return statistics.median(ts), sum(v.nbytes for v in sd.values())

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--epochs', type=int, default=4, help='one save per epoch but the last')
    p.add_argument('--sizes', default='100,400', help='model sizes in MB, from 100 and 400')
    p.add_argument('--dir', default=None, help='folder for the checkpoints (default: the system temp folder)')
    p.add_argument('--with-opt', action='store_true', help='save the optimizer state too (Adam: 3 x the model bytes)')
    p.add_argument('--threads', type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    p.add_argument('--modes', default='none,memcpy,fastai,sync,background,sync-nofsync,background-nofsync',
                   help="modes to run, in rotation ('none' is needed; 'memcpy' for the ÷ memcpy columns)")
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    cpu = torch.device(a.device).type == 'cpu'
    sizes = {'100': (1024, 24, 16 if cpu else 2048, 6 if cpu else 40), '400': (2048, 24, 16 if cpu else 2048, 4 if cpu else 20)}
    modes = a.modes.split(',')
    assert modes[0] == 'none', "--modes must start with 'none' (the paired fit without saves)"
    print(f"device {a.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, with_opt={a.with_opt}, {a.epochs} epochs = {a.epochs-1} saves per fit, {a.reps} rotations")
    for name in a.sizes.split(','):
        size = sizes[name]
        copy_s, nbytes = memcpy_time(size, a.device)
        if a.with_opt: copy_s, nbytes = 3*copy_s, 3*nbytes  # Adam's two moments are the size of the model
        run(size, 'none', a)  # warm-up
        walls, blocked = {m: [] for m in modes}, {m: [] for m in modes}
        for r in range(a.reps):
            for m in modes[r % len(modes):] + modes[:r % len(modes)]:
                w, b = run(size, m, a); walls[m].append(w); blocked[m] += b
        lost = {m: [(w - w0)/(a.epochs - 1) for w, w0 in zip(walls[m], walls['none'])] for m in modes[1:]}
        med = lambda xs: statistics.median(xs)
        copy_in_fit = med(blocked['memcpy']) if 'memcpy' in modes else float('nan')  # the yardstick: the same copy, same points, same fits
        print(f"\n{nbytes/1e6:.0f} MB state: memcpy in the fits {copy_in_fit*1e3:.1f} ms (alone, before them: {copy_s*1e3:.1f} ms); "
              f"fit without saves {med(walls['none']):.2f} s [{min(walls['none']):.2f}-{max(walls['none']):.2f}]")
        print(f"{'mode':<20}{'blocked/save ms':>16}{'÷ memcpy':>10}{'lost/save ms':>14}{'÷ memcpy':>10}{'÷ our sync':>12}   lost per rotation (ms)")
        for m in modes[1:]:
            b, l = med(blocked[m]), med(lost[m])
            ratio_sync = med([x/y for x, y in zip(lost[m], lost['sync'])]) if 'sync' in modes and min(lost['sync']) > 0 else float('nan')
            print(f"{m:<20}{b*1e3:>16.1f}{b/copy_in_fit:>10.2f}{l*1e3:>14.1f}{l/copy_in_fit:>10.2f}{ratio_sync:>12.2f}   "
                  + ' '.join(f'{x*1e3:.0f}' for x in lost[m]))
        if {'sync', 'background'} <= set(modes):
            best = min(('sync', 'background'), key=lambda m: med(lost[m]))
            print(f"least training time lost on {a.device}: {best} (SaveEvery's default: background)")
        for m in ('sync', 'background'):
            if not {m, m+'-nofsync'} <= set(modes): continue
            bl, bn, ll, ln = med(blocked[m]), med(blocked[m+'-nofsync']), med(lost[m]), med(lost[m+'-nofsync'])
            pairs = [x/y for x, y in zip(lost[m], lost[m+'-nofsync']) if x > 0 and y > 0]  # a negative "lost" is noise
            print(f"fsync, {m}: blocked/save {bl*1e3:.1f} vs {bn*1e3:.1f} ms without ({bl/bn:.2f}x, {(bl-bn)*1e3:+.1f} ms); lost/save "
                  f"{ll*1e3:.1f} vs {ln*1e3:.1f} ms without ({(ll-ln)*1e3:+.1f} ms; median of paired ratios {med(pairs) if pairs else float('nan'):.2f})")

if __name__ == '__main__': main()
