"What the test files share: a quiet fit, copies and comparisons of model states, the exact mean they should equal"
from pathlib import Path
import torch
from fastai.callback.core import Callback
from ckpt_avg.save import SaveEveryNCallback


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

def payload_offset(path):
    "Offset in `path` of bytes inside its largest tensor (the weights, not the zip's headers)"
    sd = torch.load(path, weights_only=True)
    sd = sd.get('model', sd)
    t = max(sd.values(), key=lambda t: t.numel())
    off = path.read_bytes().find(t.numpy().tobytes()[:64])
    assert off > 0
    return off + 32

def flip(path):
    "One bit of a weight changed: same size, loads without complaint (torch.load does not check the CRC32)"
    b = bytearray(path.read_bytes()); b[payload_offset(path)] ^= 0x10; path.write_bytes(bytes(b))


class Capture(Callback):
    "The model's state and iteration each time the fit's SaveEvery has just taken a save, and its state at the end"
    order = SaveEveryNCallback.order + 0.5
    def before_fit(self):
        self.saver = next(cb for cb in self.learn.cbs if isinstance(cb, SaveEveryNCallback))
        self.states, self.iters, self.last = [], [], None
    def _grab(self):
        # a new entry: the saver took the state at this step (written now, or in the background while training goes on)
        if self.saver.last_save is not None and self.saver.last_save is not self.last:
            self.last = self.saver.last_save
            self.states.append(state(self.model)); self.iters.append(self.train_iter)
    def after_batch(self): self._grab()
    def after_epoch(self): self._grab()
    def after_fit(self): self.final = state(self.model)
