"""Save time of a ~200 MB state dict: torch's zip CRC32 on vs off, with and without our xxh3_128 content hash.

    OMP_NUM_THREADS=1 python bench/hash_bench.py [--mb 200] [--reps 7] [--dir DIR]

Every repetition runs all modes once, in a rotated order (paired, alternated runs); each mode's time is divided by
the baseline's time *of the same repetition* and the medians of those ratios are printed, with median times.
Each save writes a new file (removed after), as `SaveEvery` does. Numbers are wall time, page cache, no fsync.
"""
import argparse, os, statistics, tempfile, time
from pathlib import Path
import torch
from ckpt_avg.manifest import atomic_write, file_hash

def make_state(mb):
    n = mb*2**20//4//8
    return {f'layer{i}.weight': torch.randn(n) for i in range(8)}

def crc(on): torch.serialization.set_crc32_options(on)

def plain(state, path, on):
    crc(on); torch.save(state, path)
def hashed(state, path, on):  # what SaveEvery does: torch.save into atomic_write's hashing writer
    crc(on); atomic_write(path, lambda f: torch.save(state, f))
def file_object(state, path, on):  # torch.save into an open Python file object, no hash: the cost of the Python write path
    crc(on)
    with open(path, 'wb') as f: torch.save(state, f)
def hash_after(state, path, on):  # torch.save to the path, then hash by reading the file back (it is in the page cache)
    crc(on); torch.save(state, path); file_hash(path)

MODES = {  # name: (function, crc on)
    'torch.save, CRC32 on (torch default)': (plain, True),
    'torch.save, CRC32 off': (plain, False),
    'atomic_write + xxh3 inline, CRC32 on': (hashed, True),
    'atomic_write + xxh3 inline, CRC32 off': (hashed, False),
    'torch.save into a file object, CRC32 off': (file_object, False),
    'torch.save CRC32 off, then xxh3 re-read': (hash_after, False),
}

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--mb', type=int, default=200); p.add_argument('--reps', type=int, default=7)
    p.add_argument('--dir', type=Path, default=None)
    a = p.parse_args()
    state = make_state(a.mb)
    size = sum(t.numel()*t.element_size() for t in state.values())
    folder = Path(tempfile.mkdtemp(dir=a.dir, prefix='hash_bench_'))
    old = torch.serialization.get_crc32_options()
    names = list(MODES)
    times = {n: [] for n in names}
    try:
        for r in range(a.reps + 1):  # the first round warms up and is dropped
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                f, on = MODES[n]
                path = folder/f'state_{r}.pth'
                t = time.perf_counter(); f(state, path, on); dt = time.perf_counter() - t
                path.unlink()
                if r: times[n].append(dt)
    finally:
        crc(old)
        for q in folder.iterdir(): q.unlink()
        folder.rmdir()
    base = names[0]
    print(f"state: {size/1e6:.0f} MB in {len(state)} tensors, {a.reps} paired repetitions, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), folder {folder.parent}")
    print(f"{'mode':44}{'median s':>10}{'GB/s':>8}{'÷ CRC on (paired)':>20}{'÷ CRC off (paired)':>20}")
    for n in names:
        med = statistics.median(times[n])
        r_on = statistics.median(x/y for x, y in zip(times[n], times[base]))
        r_off = statistics.median(x/y for x, y in zip(times[n], times[names[1]]))
        print(f"{n:44}{med:10.3f}{size/med/1e9:8.2f}{r_on:20.2f}{r_off:20.2f}")

if __name__ == '__main__': main()
