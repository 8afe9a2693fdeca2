"""One rank of the two-process DDP tests in test_ddp.py; run by `torchrun --nproc_per_node 2 ddp_worker.py FOLDER MODE`.

fastai's own distributed path (`learn.distrib_ctx`, accelerate's DDP over gloo with `cpu=True`) runs unchanged, except
for one line fastai hard-codes for GPUs: `DistributedDL._broadcast` moves the shuffled indices to CUDA before
broadcasting them. Here the same broadcast goes through plain `torch.distributed` with a CPU tensor, as gloo allows.
"""
import json, os, sys, time
from pathlib import Path
import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL
from fastai.torch_core import rank_distrib
from ckpt_avg.save import SaveEvery, SaveEveryNCallback
from ckpt_avg.average import AverageLast
from ckpt_avg.demo import digits_learner

def _cpu_broadcast(self, t, rank):
    t = torch.LongTensor(t)
    dist.broadcast(t, rank)
    return t.tolist()
DistributedDL._broadcast = _cpu_broadcast

class Watch(SaveEvery):
    "Records where each rank decided to save and what it wrote; on rank 1 its own clock always says a save is due"
    def before_fit(self): super().before_fit(); self.save_iters, self.commits = [], 0
    def _save(self, trigger):
        if self.last_iter != self.train_iter: self.save_iters.append(self.train_iter)
        super()._save(trigger)
        if rank_distrib() == 1: self.last_time = float('-inf')  # left alone, rank 1 would save at every batch
    def _commit(self, entry, state): self.commits += 1; super()._commit(entry, state)

class SlowBatches(Callback):
    def after_batch(self):
        if self.training: time.sleep(0.02)

class Damage(Callback):
    "On rank 0, truncate the newest checkpoint between SaveEvery's after_fit and AverageLast's"
    order = SaveEveryNCallback.order + 0.5
    def after_fit(self):
        if rank_distrib() == 0:
            p = self.learn.cbs.filter(lambda c: isinstance(c, Watch))[0].paths[-1]
            p.write_bytes(p.read_bytes()[:100])

def main(folder, mode):
    torch.set_num_threads(1)
    rank = int(os.environ['RANK'])
    learn = digits_learner(path=folder)
    saver = Watch(minutes=0.15/60, epochs=1, background=(mode == 'background'))
    cbs = [SlowBatches(), saver, AverageLast(3)] + ([Damage()] if mode == 'damage' else [])
    out = dict(rank=rank, error=None)
    try:
        with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_bar(), learn.no_logging(): learn.fit(2, 0.1, cbs=cbs)
    except Exception as e: out['error'] = f'{type(e).__name__}: {e}'
    torch.save(learn.model.state_dict(), Path(folder)/f'rank{rank}.state')
    out.update(save_iters=saver.save_iters, commits=saver.commits, saved=len(saver.saved),
               backend=dist.get_backend() if dist.is_initialized() else None,
               world=dist.get_world_size() if dist.is_initialized() else 1,
               wrapped=type(learn.model).__name__, in_background=saver.in_background)
    (Path(folder)/f'rank{rank}.json').write_text(json.dumps(out))

if __name__ == '__main__': main(sys.argv[1], sys.argv[2])
