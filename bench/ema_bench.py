"""What one EMA update costs against one plain training step of the same model.

An fp32 MLP of about `--mb` MB (`--depth` blocks of Linear + LayerNorm + ReLU) is trained on synthetic data with
fastai's Adam, in plain PyTorch steps (forward, loss, backward, `opt.step()`, `opt.zero_grad()`, batch `--bs`).
An `EMACallback` attached to the same Learner is bound to the model, and its first update (a copy) is made untimed.
Then, `--reps` times, one training step and one `ema.update()` are timed back to back (on CUDA, synchronised), and
the script prints the median of the paired ratios update / step, for:

* `ema`: the EMA on the model's device (the default), one fused `torch._foreach_lerp_`;
* `ema-cpu`: with `--device cuda` only, the EMA kept on the CPU (`device='cpu'`): a device-to-host copy per update;
* `loop`: the same update as a per-tensor Python loop (`a.mul_(d).add_(b, alpha=1-d)`), for scale.

    python bench/ema_bench.py                          # CPU, ~100 MB
    python bench/ema_bench.py --mb 25 --reps 10
    python bench/ema_bench.py --device cuda --mb 400 --bs 1024
"""
import argparse, statistics, time
import torch
from torch import nn
from fastai.basics import Learner, DataLoaders, Adam
from fastai.data.load import DataLoader
from ckpt_avg.ema import EMA

def mlp(mb:float, depth:int):
    width = int((mb*1e6/4/depth)**0.5)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()) for _ in range(depth)],
                         nn.Linear(width, 10)), width

def timed(fn, device):
    if device.type == 'cuda': torch.cuda.synchronize()
    t = time.perf_counter(); fn()
    if device.type == 'cuda': torch.cuda.synchronize()
    return time.perf_counter() - t

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--mb', type=float, default=100, help='model size in MB (fp32)')
    p.add_argument('--depth', type=int, default=4)
    p.add_argument('--bs', type=int, default=256, help='batch size of the training step')
    p.add_argument('--reps', type=int, default=20)
    p.add_argument('--device', default='cpu')
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    model, width = mlp(a.mb, a.depth)
    model = model.to(device)
    x, y = torch.randn(a.bs, width, device=device), torch.randint(0, 10, (a.bs,), device=device)
    dl = DataLoader(list(zip(x.cpu(), y.cpu())), bs=a.bs)
    learn = Learner(DataLoaders(dl, dl), model, loss_func=nn.CrossEntropyLoss(), opt_func=Adam)
    learn.create_opt()
    emas = {'ema': EMA(decay=0.999)}
    if device.type == 'cuda': emas['ema-cpu'] = EMA(decay=0.999, device='cpu')
    for e in emas.values(): learn.add_cb(e); e._bind(); e.update()   # bound to the model, first update (a copy) untimed
    def step():
        loss = learn.loss_func(model(x), y); loss.backward(); learn.opt.step(); learn.opt.zero_grad()
    ema = emas['ema']
    def loop():
        d = ema.decay_at(ema.n_updates)
        with torch.no_grad():
            for t, s in zip(ema._avg, ema._src): t.mul_(d).add_(s, alpha=1-d)
    updates = {k: e.update for k, e in emas.items()} | {'loop': loop}
    step(); [u() for u in updates.values()]   # warm-up
    ratios, steps, times = {k: [] for k in updates}, [], {k: [] for k in updates}
    for _ in range(a.reps):
        for k, u in updates.items():
            s = timed(step, device); t = timed(u, device)
            steps.append(s); times[k].append(t); ratios[k].append(t/s)
    n = sum(v.numel() for v in model.state_dict().values())
    print(f"device {device}{' ('+torch.cuda.get_device_name(device)+')' if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; MLP {a.depth}x{width}, {n*4/1e6:.0f} MB fp32; batch {a.bs}; {a.reps} pairs each")
    print(f"training step: median {statistics.median(steps)*1e3:.1f} ms")
    for k in updates:
        print(f"{k:8s} update: median {statistics.median(times[k])*1e3:.2f} ms, update/step median of paired ratios "
              f"{statistics.median(ratios[k]):.4f} (min {min(ratios[k]):.4f}, max {max(ratios[k]):.4f})")

if __name__ == '__main__': main()
