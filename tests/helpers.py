"What the test files share: a quiet fit, copies and comparisons of model states, the exact mean they should equal"
from pathlib import Path
import torch


def fit(learn, n, cbs, lr=0.1, fn='fit', quiet=True):
    "`learn.fit` (or `fn`, e.g. 'fine_tune') without the progress bar, and without the metrics table if `quiet`"
    with learn.no_bar():
        if quiet:
            with learn.no_logging(): getattr(learn, fn)(n, lr, cbs=cbs)
        else: getattr(learn, fn)(n, lr, cbs=cbs)

def state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}

def states_equal(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def mean_of(states):
    "The float64 mean of `states` rounded once to each tensor's dtype; integer tensors from the last state"
    return {k: (sum(s[k].double() for s in states)/len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[-1].items()}

def folder(learn): return Path(learn.path)/learn.model_dir
