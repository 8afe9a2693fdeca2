"""Checks of SaveEvery's CUDA path, run by hand on a GPU machine: pinned snapshot buffers, non-blocking copies that
see the weights as they were at the save, time the loop is blocked versus one device-to-host memcpy, CRC-off writes,
and averaging of CUDA-trained checkpoints on a CPU-only process (CUDA_VISIBLE_DEVICES='', map_location='cpu').

    python bench/cuda_check.py [--mb 400]
"""
import argparse, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import torch
from torch import nn
from ckpt_avg.writer import Snapshot, BackgroundWriter, save_no_crc

DRY = bool(os.environ.get('CUDA_CHECK_DRY'))  # run the same code on the CPU, to check the script itself
DEV, PIN = ('cpu', False) if DRY else ('cuda', True)
def cuda_sync():
    if not DRY: torch.cuda.synchronize()

def med(f, n=5):
    ts = []
    for _ in range(n):
        cuda_sync(); t = time.perf_counter(); f(); cuda_sync(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

CPU_AVERAGE = r'''
import sys, torch
from ckpt_avg.core import average_checkpoints
assert not torch.cuda.is_available()
files, ref = sys.argv[1:-1], torch.load(sys.argv[-1])
avg = average_checkpoints(files)
print('cpu-only average equal to the float64 reference:', all(torch.equal(avg[k], ref[k]) for k in ref), 'devices', {str(v.device) for v in avg.values()})
try: torch.load(files[-1]); print('plain torch.load of the last file on a CPU-only process: ok')
except Exception as e: print('plain torch.load of the last file on a CPU-only process fails:', type(e).__name__, str(e).splitlines()[0][:90])
'''

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--mb', type=int, default=400); p.add_argument('--bs', type=int, default=4096)
    p.add_argument('--steps', type=int, default=70); p.add_argument('--every', type=int, default=20); p.add_argument('--reps', type=int, default=3)
    a = p.parse_args()
    assert DRY or torch.cuda.is_available(), 'no GPU'
    if os.environ.get('SWITCH'): sys.setswitchinterval(float(os.environ['SWITCH'])); print('switch interval', sys.getswitchinterval())
    print(torch.__version__, 'DRY RUN ON CPU' if DRY else torch.cuda.get_device_name(), 'python', sys.version.split()[0])
    width = 2048 if a.mb >= 400 else 1024
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(24)]).to(DEV)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model(torch.randn(8, width, device=DEV)).sum().backward(); opt.step()
    state = lambda: {'model': model.state_dict(), 'opt': opt.state_dict()}
    nbytes = sum(v.nbytes for v in model.state_dict().values()) + sum(
        v.nbytes for s in opt.state_dict()['state'].values() for v in s.values() if torch.is_tensor(v))
    # the floor: one device-to-host copy of the whole state into pinned memory allocated beforehand
    sd = state(); flat = [v for v in model.state_dict().values()] + [v for s in opt.state_dict()['state'].values() for v in s.values() if torch.is_tensor(v) and v.is_cuda]
    bufs = [torch.empty(v.shape, dtype=v.dtype, pin_memory=PIN) for v in flat]
    def memcpy():
        for b, v in zip(bufs, flat): b.copy_(v, non_blocking=True)
    copy_s = med(memcpy)
    snap = Snapshot()
    t = time.perf_counter(); first = snap.take(state()); snap.ready(); first_s = time.perf_counter() - t
    ptrs = [b.data_ptr() for b in snap.buffers.values()]
    blocked = []
    for _ in range(5):
        cuda_sync(); t = time.perf_counter(); snap.take(state()); blocked.append(time.perf_counter() - t); snap.ready()
    take_ready = med(lambda: (snap.take(state()), snap.ready()))
    print(f"state {nbytes/1e9:.2f} GB on {next(model.parameters()).device}: D2H memcpy into pinned {copy_s*1e3:.1f} ms "
          f"({nbytes/copy_s/1e9:.1f} GB/s); first take (allocates pinned buffers) {first_s*1e3:.0f} ms")
    print(f"Snapshot.take: training thread blocked {statistics.median(blocked)*1e3:.2f} ms median "
          f"(= {statistics.median(blocked)/copy_s:.3f} x memcpy); take+ready {take_ready*1e3:.1f} ms (= {take_ready/copy_s:.2f} x memcpy)")
    n_cuda = sum(v.is_cuda for v in model.state_dict().values()) + sum(v.is_cuda for st in opt.state_dict()['state'].values() for v in st.values() if torch.is_tensor(v))
    print(f'pinned buffers: {sum(b.is_pinned() for b in snap.buffers.values())} = CUDA tensors in the state: {n_cuda}',
          '| buffers reused across takes:', ptrs == [b.data_ptr() for b in snap.buffers.values()])
    # non-blocking copies are queued before the next in-place update on the same stream: the snapshot is the old weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = snap.take(state())
    with torch.no_grad():
        for q in model.parameters(): q.add_(1.0)
    snap.ready()
    print('snapshot holds the weights of the save, not the update queued after it:',
          all(torch.equal(s['model'][k], before[k].cpu()) for k in before))
    # writes: torch.save default (CRC32) vs save_no_crc, from the pinned snapshot
    d = Path(tempfile.mkdtemp())
    t_crc = med(lambda: torch.save(s, d/'crc.pth'), 3); t_nocrc = med(lambda: save_no_crc(s, d/'nocrc.pth'), 3)
    print(f"write {nbytes/1e9:.2f} GB: torch.save {t_crc*1e3:.0f} ms, save_no_crc {t_nocrc*1e3:.0f} ms; CRC option restored: {torch.serialization.get_crc32_options()}")
    # a plain PyTorch training loop with a save every `every` steps: fastai-like torch.save (CRC32), our synchronous
    # save (CRC off, from the live state), our background save (snapshot, then write on a thread)
    x = torch.randn(a.bs, width, device=DEV)
    def step(): opt.zero_grad(); model(x).square().mean().backward(); opt.step()
    for _ in range(3): step()
    step_s = med(step, 5)
    # model weights only, as fastai's SaveModelCallback saves by default
    mflat = list(model.state_dict().values()); mbufs = [torch.empty(v.shape, dtype=v.dtype, pin_memory=PIN) for v in mflat]
    def mcopy():
        for b, v in zip(mbufs, mflat): b.copy_(v, non_blocking=PIN)
    copy_s = med(mcopy)
    state = model.state_dict
    snap = Snapshot()
    bw, n = BackgroundWriter(), [0]
    def fname(): n[0] += 1; return d/f'loop{n[0]}.pth'
    def bg():
        bw.wait(); st = snap.take(state()); f = fname()
        bw.submit(lambda: (snap.ready(), save_no_crc(st, f)))
    modes = {'none': None, 'torch.save (CRC, as fastai)': lambda: torch.save(state(), fname()),
             'sync, CRC off': lambda: save_no_crc(state(), fname()), 'background': bg}
    def loop(save, steps=a.steps, every=a.every):
        cuda_sync(); t = time.perf_counter(); blocked = []
        for i in range(1, steps+1):
            step()
            if save and i % every == 0 and i < steps: t0 = time.perf_counter(); save(); blocked.append(time.perf_counter() - t0)
        bw.wait(); cuda_sync(); wall = time.perf_counter() - t
        for f in d.glob('loop*.pth'): f.unlink()
        return wall, blocked
    loop(modes['sync, CRC off']); loop(bg)  # warm-up
    walls, blocked = {m: [] for m in modes}, {m: [] for m in modes}
    names = list(modes)
    for r in range(a.reps):
        for m in names[r % 4:] + names[:r % 4]:
            wv, bv = loop(modes[m]); walls[m].append(wv); blocked[m] += bv
    saves = (a.steps - 1) // a.every  # none at the last step: a long run's writes overlap training, only the fit's end waits
    print(f"\ntraining loop: {a.steps} steps of {step_s*1e3:.1f} ms (batch {a.bs}), a save every {a.every}; "
          f"(none at the end), medians of {a.reps} rotations; model state {sum(v.nbytes for v in mflat)/1e9:.2f} GB, memcpy = {copy_s*1e3:.1f} ms")
    lost = {m: [(w - w0)/saves for w, w0 in zip(walls[m], walls['none'])] for m in names[1:]}
    for m in names[1:]:
        bl, lo = statistics.median(blocked[m]), statistics.median(lost[m])
        print(f"  {m:<28} blocked/save {bl*1e3:7.1f} ms = {bl/copy_s:6.2f} x memcpy | lost/save {lo*1e3:7.1f} ms = {lo/copy_s:6.2f} x memcpy"
              f" = {statistics.median([x/y for x, y in zip(lost[m], lost['sync, CRC off'])]):.2f} x sync | per rotation {[round(v*1e3) for v in lost[m]]}")
    # averaging CUDA-trained checkpoints on a CPU-only process: files from our writer (CPU tensors) and from a plain
    # torch.save of the CUDA state (CUDA tensors: needs map_location, which load_state passes)
    files, states = [], []
    for i in range(3):
        step()
        sd = model.state_dict(); states.append({k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
        st = snap.take(sd); snap.ready(); f = d/f'ours{i}.pth'; save_no_crc(st, f); files.append(str(f))
        f = d/f'cuda{i}.pth'; torch.save(sd, f); files.append(str(f))
    ref = {k: (sum(s[k] for s in states)/3).to(v.dtype).cpu() for k, v in model.state_dict().items()}
    torch.save(ref, d/'ref.pth')
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    for name, fs in (('files written by SaveEvery (pinned CPU snapshot)', files[0::2]), ('plain torch.save of the CUDA state_dict', files[1::2])):
        r = subprocess.run([sys.executable, '-c', CPU_AVERAGE, *fs, str(d/'ref.pth')], capture_output=True, text=True, env=env)
        print(f"{name}: {r.stdout.strip() or r.stderr[-500:]}")

    fastai_check(d)

def fastai_check(d):
    "SaveEvery in a real fastai fit on CUDA: the default is background; the files, averaged on a CPU-only process"
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        from save_bench import learner
        from ckpt_avg.save import SaveEvery
        from ckpt_avg.average import AverageLast
    except ImportError as e: return print('\nfastai part skipped:', e)
    class Captured(SaveEvery):
        def _write(self, trigger):
            self.states.append({k: v.detach().double().cpu() if v.is_floating_point() else v.cpu() for k, v in self.model.state_dict().items()})
            super()._write(trigger)
    learn = learner(1024, 4, 256, 10, DEV, d/'fastai')
    saver = Captured(epochs=1); saver.states = []
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-3, cbs=[saver, AverageLast(3)])
    print(f"\nfastai {__import__('fastai').__version__}: SaveEvery on {next(learn.model.parameters()).device}: "
          f"background by default: {saver.in_background}; files: {[p.name for p in saver.paths]}")
    ok = all(all(torch.equal(torch.load(p, map_location='cpu')[k].double() if v.is_floating_point() else torch.load(p, map_location='cpu')[k], v)
                 for k, v in st.items()) for p, st in zip(saver.paths, saver.states))
    print('each file holds the weights at its save:', ok)
    ref = {k: (sum(st[k] for st in saver.states)/3).to(v.dtype) if v.is_floating_point() else saver.states[-1][k]
           for k, v in learn.model.state_dict().items()}
    ref = {k: v.cpu() for k, v in ref.items()}
    torch.save(ref, d/'ref_fastai.pth')
    print('AverageLast loaded the exact mean into the CUDA model:', all(torch.equal(learn.model.state_dict()[k].cpu(), ref[k]) for k in ref))
    r = subprocess.run([sys.executable, '-c', CPU_AVERAGE, *map(str, saver.paths), str(d/'ref_fastai.pth')], capture_output=True, text=True,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    print(f"SaveEvery's CUDA-trained files, averaged on a CPU-only process: {r.stdout.strip() or r.stderr[-500:]}")

if __name__ == '__main__': main()
