"""EMA, average of the last saves, or final weights? (issue 15, item 5)

Trains the tutorial's set-ups with `SaveEvery(epochs=1)`, an `EMA` and `AverageLast(5, report=True)` in the same fit,
over several seeds, at a constant learning rate (`learn.fit`) and with one-cycle (`learn.fit_one_cycle`), and prints,
from `AverageLast`'s report, the validation loss and metric of the final weights, of the average of the last 5 saves
and of the EMA: mean ± std over seeds, and in how many seeds each has a lower validation loss than the final weights.

* digits: `ckpt_avg.demo.digits_learner` (the small CNN with BatchNorm, 20% wrong training labels, SGD momentum 0.9),
  lr 0.1, as in the tutorial; metric: accuracy.
* diabetes: scikit-learn's `load_diabetes` (442 patients, 10 numeric features; the target standardised, so the loss
  is in units of its variance), a random 30% validation split per seed, fastai's `tabular_learner(layers=[64, 32])`
  (Adam), lr 1e-2; metric: rmse (standardised units).

The EMA uses `decay=0.99` with the default warm-up (`warmup_power=2/3`), and averages BatchNorm statistics (the
default). Each run writes its checkpoints to a temporary folder, removed afterwards.

    OMP_NUM_THREADS=1 python bench/ema_vs_avg.py                     # defaults: 5 seeds, 20 / 30 epochs
    OMP_NUM_THREADS=1 python bench/ema_vs_avg.py --seeds 2 --digits-epochs 6 --diabetes-epochs 10
"""
import argparse, shutil, statistics, tempfile, time, warnings
from pathlib import Path
import numpy as np, pandas as pd, torch
from sklearn.datasets import load_diabetes
from fastai.callback.schedule import *  # fit_one_cycle
from fastai.metrics import rmse
from fastai.tabular.all import TabularDataLoaders, tabular_learner, Normalize
from fastai.torch_core import set_seed
from ckpt_avg.demo import digits_learner
from ckpt_avg.save import SaveEvery
from ckpt_avg.ema import EMA
from ckpt_avg.average import AverageLast

ROWS = (('final', 'final'), ('average', 'last-5 average'), ('ema', 'EMA'))

def diabetes_learner(path, seed:int):
    "A tabular regressor on scikit-learn's diabetes set, target standardised, a random 30% validation split"
    x, y = load_diabetes(return_X_y=True, as_frame=True)
    df = x.assign(y=((y - y.mean())/y.std()).astype('float32'))
    valid = np.random.default_rng(seed).permutation(len(df))[:int(0.3*len(df))]
    set_seed(seed, reproducible=True)
    dls = TabularDataLoaders.from_df(df, path=path, cont_names=list(x.columns), y_names='y', procs=[Normalize],
                                     valid_idx=list(valid), bs=32)
    return tabular_learner(dls, layers=[64, 32], metrics=rmse)

SETUPS = dict(digits=(digits_learner, 0.1, 'accuracy'), diabetes=(diabetes_learner, 1e-2, '_rmse'))  # fastai names rmse '_rmse'

def one_run(setup:str, schedule:str, seed:int, epochs:int, decay:float)->dict:
    "AverageLast's report of one fit: {'final': {...}, 'average': {...}, 'ema': {...}}"
    make, lr, _ = SETUPS[setup]
    path = Path(tempfile.mkdtemp(prefix='ema_vs_avg_'))
    try:
        learn = make(path=path, seed=seed)
        avg = AverageLast(5, report=True)
        cbs = [SaveEvery(epochs=1), EMA(decay=decay), avg]
        with learn.no_bar(), learn.no_logging():
            if schedule == 'constant': learn.fit(epochs, lr, cbs=cbs)
            else: learn.fit_one_cycle(epochs, lr, cbs=cbs)
        return avg.results
    finally: shutil.rmtree(path, ignore_errors=True)

def ms(vals, fmt): return f"{fmt(statistics.mean(vals))} ± {fmt(statistics.stdev(vals) if len(vals) > 1 else 0.)}"

def table(setup:str, schedule:str, runs:list, epochs:int)->str:
    metric = SETUPS[setup][2]
    pct = metric == 'accuracy'
    fm = (lambda v: f"{100*v:.1f}%") if pct else (lambda v: f"{v:.4f}")
    lines = [f"\n{setup}, {schedule} lr, {epochs} epochs, {len(runs)} seeds",
             f"{'':16}{'valid loss':>20}{metric.strip('_'):>20}{'loss < final':>14}{metric.strip('_') + ' better':>18}"]
    for key, name in ROWS:
        loss = [r[key]['valid_loss'] for r in runs]
        met = [r[key][metric] for r in runs]
        if key == 'final': wins = better = '–'
        else:
            wins = f"{sum(r[key]['valid_loss'] < r['final']['valid_loss'] for r in runs)}/{len(runs)}"
            better = f"{sum((r[key][metric] > r['final'][metric]) if pct else (r[key][metric] < r['final'][metric]) for r in runs)}/{len(runs)}"
        lines.append(f"{name:16}{ms(loss, lambda v: f'{v:.4f}'):>20}{ms(met, fm):>20}{wins:>14}{better:>18}")
    return '\n'.join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, default=5)
    p.add_argument('--digits-epochs', type=int, default=20)
    p.add_argument('--diabetes-epochs', type=int, default=30)
    p.add_argument('--decay', type=float, default=0.99, help="the EMA's decay (default warm-up)")
    a = p.parse_args()
    warnings.filterwarnings('ignore')
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); EMA(decay={a.decay}), AverageLast(5), SaveEvery(epochs=1)")
    t0 = time.perf_counter()
    for setup, epochs in (('digits', a.digits_epochs), ('diabetes', a.diabetes_epochs)):
        for schedule in ('constant', 'one-cycle'):
            t = time.perf_counter()
            runs = [one_run(setup, schedule, s, epochs, a.decay) for s in range(a.seeds)]
            print(table(setup, schedule, runs, epochs) + f"\n({time.perf_counter()-t:.0f} s)", flush=True)
    print(f"\ntotal {time.perf_counter()-t0:.0f} s")

if __name__ == '__main__': main()
