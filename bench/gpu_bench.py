"""Averaging on a GPU (issue 16): the device engine next to the CPU engine and to reading the bytes, as ratios measured side by side.

Run by hand on a machine with a CUDA GPU, never in CI:
    python bench/gpu_bench.py [--mb 400] [--k 5] [--runs 5] [--opt] [--dtype fp32|bf16] [--device cuda:0]
    python bench/gpu_bench.py --dry      # the same code on the CPU, small files: checks the script, measures nothing

It writes K synthetic fastai checkpoints (`avg_bench.make_set`: 24 x [Linear w*w + LayerNorm] + BatchNorm1d, each file the
base weights plus its own noise; with optimizer state when --opt) in a temporary folder, then, in this process, in
rounds whose order rotates (round 0 warms the page cache, CUDA and the kernels, and is not counted):
  read      a `cat` of the model's bytes in the K files (every tensor's byte range through a reused 1 MiB buffer)
  send      the same number of bytes copied from pinned memory to the GPU in 8 MB pieces (the PCIe floor), no reading
  cpu       `average_checkpoints(files, into=..., kernel=KERNEL)`: the CPU engine
  device    `average_checkpoints(files, into=..., device=DEVICE)`: the device engine (read into pinned buffers, sent, summed
            in float64 on the GPU, rounded once, copied back)
and prints the median of each and its ratio to `read` (median of the per-round ratios), after checking that the device
engine's result has the CPU engine's bits. With --dry the device engine runs its pipeline on the CPU (nothing pinned, no
stream): the figures of a dry run are not measurements, keep them out of bench/results.
"""
import argparse, os, statistics, sys, tempfile, shutil, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import torch
from avg_bench import make_set, cat_model_bytes
from ckpt_avg import kernels
from ckpt_avg.core import average_checkpoints

WINDOW = 8 << 20  # bytes per transfer in `send`, about the device engine's window of float32


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def send_bytes(nbytes:int, device):
    "Seconds to copy `nbytes` from one pinned buffer to the device in WINDOW pieces (a CPU copy in a dry run)"
    cuda = device.type == 'cuda'
    src = torch.empty(WINDOW, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(WINDOW, dtype=torch.uint8, device=device)
    sync(device)
    t = time.perf_counter()
    for i in range(0, nbytes, WINDOW): dst[:min(WINDOW, nbytes-i)].copy_(src[:min(WINDOW, nbytes-i)], non_blocking=cuda)
    sync(device)
    return time.perf_counter() - t


def timed(f, device):
    sync(device); t = time.perf_counter(); f(); sync(device)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--mb', type=float, help='MB of weights per file (default 400; 4 with --dry)')
    ap.add_argument('--k', type=int, default=5)
    ap.add_argument('--runs', type=int, help='counted rounds (default 5; 2 with --dry)')
    ap.add_argument('--dtype', choices=['fp32', 'bf16'], default='fp32')
    ap.add_argument('--opt', action='store_true', help='fastai files with optimizer state (3x the weights on disk)')
    ap.add_argument('--device', default='cuda', help="the device engine's device (default: %(default)s)")
    ap.add_argument('--kernel', default='auto', help="the CPU engine's kernel: auto, numpy or numba (default: %(default)s)")
    ap.add_argument('--dir', type=Path, help='where to write the checkpoints (default: a temporary folder, removed at the end)')
    ap.add_argument('--dry', action='store_true', help='run on the CPU with small files, to check the script; measures nothing')
    a = ap.parse_args()
    mb, runs = a.mb or (4 if a.dry else 400), a.runs or (2 if a.dry else 5)
    if a.dry: kernels._STAGE_ON_CPU, device_arg = True, 'cpu'  # the device pipeline, run on the CPU
    else: device_arg = a.device
    device = kernels.check_device(device_arg)
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[a.dtype]
    folder = Path(a.dir or tempfile.mkdtemp(prefix='gpu_bench_'))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        files, model_bytes = make_set(folder, mb, a.k, dtype, a.opt)
        name = 'DRY RUN ON THE CPU, NOT A MEASUREMENT' if a.dry else torch.cuda.get_device_name(device)
        print(f"{a.k} x {model_bytes/1e6:.0f} MB of {a.dtype} weights{' + optimizer state' if a.opt else ''}; {name}; torch "
              f"{torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, CPU kernel {a.kernel}")
        state = average_checkpoints(files, kernel=a.kernel)
        into_cpu, into_dev = ({k: torch.empty_like(v) for k, v in state.items()} for _ in range(2))
        jobs = dict(read=lambda: cat_model_bytes(files),
                    send=lambda: send_bytes(a.k*model_bytes, device),
                    cpu=lambda: timed(lambda: average_checkpoints(files, into=into_cpu, kernel=a.kernel), device),
                    device=lambda: timed(lambda: average_checkpoints(files, into=into_dev, device=device_arg), device))
        res = {n: [] for n in jobs}
        for r in range(runs + 1):
            names = list(jobs)[r % len(jobs):] + list(jobs)[:r % len(jobs)]
            for n in names:
                t = jobs[n]()
                if r: res[n].append(t)
        same = all(torch.equal(into_dev[k], into_cpu[k]) and torch.equal(into_cpu[k], state[k]) for k in state)
        print(f"device engine's result has the CPU engine's bits: {same}")
        print(f"{'':8} {'median':>10} {'÷ read':>8}   ({runs} rounds)")
        for n, ts in res.items():
            ratio = statistics.median(t/r for t, r in zip(ts, res['read']))
            print(f"{n:8} {statistics.median(ts)*1e3:8.0f} ms {ratio:8.2f}")
        if not same: sys.exit('the device engine differs from the CPU engine')
    finally:
        if a.dir is None: shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__': main()
