"""Does recomputing BatchNorm statistics help the average on digits? Run by hand: python bench/bn_recompute.py [seeds]

The demo set-up (digits, demo CNN with BatchNorm, SGD momentum 0.9, 20% label noise, 20 epochs, lr 0.1), constant LR
and one-cycle, a save every epoch, the last 5 averaged. For every seed, one fit; then the same averaged weights are
validated as they are (BatchNorm buffers averaged), with statistics recomputed on 4 training batches, and on all of
dls.train (16 batches). Prints mean valid loss / accuracy and in how many seeds each beats the plain average.
"""
import sys, tempfile, statistics, warnings
from pathlib import Path
import fastai.callback.schedule  # fit_one_cycle
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
from ckpt_avg.core import average_checkpoints
from ckpt_avg.strategies import recompute_bn
from ckpt_avg.demo import digits_learner

warnings.simplefilter('ignore')
seeds = range(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
rows = {}
for sched in ('constant', 'one-cycle'):
    for seed in seeds:
        learn = digits_learner(path=Path(tempfile.mkdtemp()), seed=seed)
        avg = AverageLast(5, end_with='final')
        with learn.no_bar(), learn.no_logging():
            fit = learn.fit if sched == 'constant' else learn.fit_one_cycle
            fit(20, 0.1, cbs=[SaveEvery(epochs=1), avg])
        res = {'final': list(avg.results['final'].values()), 'average': list(avg.results['average'].values())}
        state = average_checkpoints(list(avg.files))
        for name, n in (('average + BN 4 batches', 4), ('average + BN all batches', None)):
            learn.model.load_state_dict(state)
            recompute_bn(learn.model, learn.dls.train, n)
            with learn.no_bar(): res[name] = [float(v) for v in learn.validate()]
        for k, v in res.items(): rows.setdefault((sched, k), []).append(v)
        print(sched, seed, {k: [round(x, 4) for x in v] for k, v in res.items()}, flush=True)

print(f"\n{'schedule':10} {'weights':26} {'valid_loss':>10} {'accuracy':>9}  beats plain average (loss)")
for (sched, k), vals in rows.items():
    loss, acc = statistics.mean(v[0] for v in vals), statistics.mean(v[1] for v in vals)
    plain = rows[(sched, 'average')]
    wins = sum(v[0] < p[0] for v, p in zip(vals, plain))
    print(f"{sched:10} {k:26} {loss:10.4f} {acc:9.2%}  {'' if k == 'average' else f'{wins} of {len(vals)}'}")
