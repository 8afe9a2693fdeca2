"""EMA: the callback's average equals one computed by hand in float64 from the weights after each optimizer step;
`every`, the warm-up, `start_at`, the buffer modes, `device`, skipped and accumulated steps, export, fits that are not
training, `fine_tune`, `save_as` with its manifest record, sidecars and their rotation, and an exact resume."""
import warnings
import pytest, torch
from fastai.callback.core import Callback, CancelStepException
from fastai.callback.training import GradientAccumulation
from fastai.learner import load_learner
import fastai.callback.schedule  # Learner.lr_find
from ckpt_avg.demo import digits_learner
from ckpt_avg.save import SaveEvery
from ckpt_avg.manifest import Manifest
from ckpt_avg.ema import EMA, EMACallback, sidecar_name
from helpers import fit, state, states_equal, folder
from test_fastai_workflows import tabular


class Record(Callback):
    "The model's state after each optimizer step that happened"
    order = EMACallback.order + 1
    def __init__(self): self.states, self.skip = [], False   # across fits: fine_tune's two
    def before_batch(self): self.skip = False
    def after_cancel_step(self): self.skip = True
    def after_step(self):
        if not self.skip: self.states.append(state(self.model))


def manual_ema(states, decay_at, averaged):
    "The EMA in float64 over `states` (one per update); keys not in `averaged` copied from the last"
    avg = None
    for n, s in enumerate(states):
        d = decay_at(n)
        avg = {k: v.double() for k, v in s.items()} if avg is None else {k: d*avg[k] + (1-d)*s[k].double() for k in s}
    return {k: (avg[k] if k in averaged else states[-1][k]) for k in states[-1]}

def assert_close(got, want, eps=1e-5):
    assert got.keys() == want.keys()
    for k in got:
        if got[k].is_floating_point(): torch.testing.assert_close(got[k].double(), want[k].double(), atol=eps, rtol=eps, msg=k)
        else: assert torch.equal(got[k], want[k].to(got[k].dtype)), k

def tensors_in(o)->bool:
    if isinstance(o, torch.Tensor): return True
    if isinstance(o, dict): return any(tensors_in(v) for v in o.values())
    return isinstance(o, (list, tuple)) and any(tensors_in(v) for v in o)

def float_keys(learn, buffers='average'):
    params = {n for n, _ in learn.model.named_parameters()}
    return {k for k, v in learn.model.state_dict().items() if v.is_floating_point() and (buffers == 'average' or k in params)}


def test_equals_manual_ema_with_warmup(tmp_path):
    learn, rec = digits_learner(path=tmp_path), Record()
    ema = EMA(decay=0.95)
    fit(learn, 2, [ema, rec])
    assert ema.n_updates == ema.n_steps == len(rec.states) == 32
    assert_close(ema.weights(), manual_ema(rec.states, lambda n: 0 if n == 0 else min(0.95, 1-(1+n)**(-2/3)), float_keys(learn)))

def test_every_without_warmup(tmp_path):
    learn, rec = digits_learner(path=tmp_path), Record()
    ema = EMA(decay=0.8, every=3, warmup_power=None)
    fit(learn, 2, [ema, rec])
    assert ema.n_steps == 32 and ema.n_updates == 10   # steps 3, 6, ..., 30
    assert_close(ema.weights(), manual_ema(rec.states[2::3], lambda n: 0 if n == 0 else 0.8, float_keys(learn)))

@pytest.mark.parametrize('start_at, first', [(1, 15), (0.5, 15), ('20it', 19)])
def test_start_at(tmp_path, start_at, first):
    "No update before the start point, as SaveEvery: the first update copies the weights at it (after epoch 1: step 16; after 20 iterations: step 20)"
    learn, rec = digits_learner(path=tmp_path), Record()
    ema = EMA(decay=0.9, start_at=start_at)
    fit(learn, 2, [ema, rec])
    assert ema.n_steps == 32 and ema.n_updates == 32 - first
    assert_close(ema.weights(), manual_ema(rec.states[first:], ema.decay_at, float_keys(learn)))

def test_buffers_copied_or_averaged(tmp_path):
    bn = '1.1.running_mean'   # digits_cnn's second ConvLayer's BatchNorm
    res = {}
    for mode in ('average', 'copy'):
        learn, rec = digits_learner(path=tmp_path/mode), Record()
        ema = EMA(decay=0.9, buffers=mode)
        fit(learn, 1, [ema, rec])
        assert_close(ema.weights(), manual_ema(rec.states, ema.decay_at, float_keys(learn, mode)))
        res[mode] = ema.weights()[bn]
    assert torch.equal(res['copy'], rec.states[-1][bn])
    assert not torch.allclose(res['average'], res['copy'])

def test_device_cpu(tmp_path):
    learn = digits_learner(path=tmp_path)
    a, b = EMA(decay=0.9), EMA(decay=0.9, device='cpu')
    fit(learn, 1, [a, b])
    assert all(v.device.type == 'cpu' for v in b._ema.values())
    assert states_equal(a.weights(), b.weights())
    on_meta = torch.empty(2, device='meta')   # a model elsewhere than the CPU (without needing a GPU)
    assert a._where(on_meta) == torch.device('meta') and b._where(on_meta) == torch.device('cpu')

class SkipEveryThird(Callback):
    "What MixedPrecision does on an overflow: cancel the optimizer step (here of batches 2, 5, 8, ...)"
    order = 15
    def before_step(self):
        if self.iter % 3 == 2: raise CancelStepException()

def test_skipped_and_accumulated_steps_do_not_count(tmp_path):
    learn, rec = digits_learner(path=tmp_path), Record()
    ema = EMA(decay=0.9)
    fit(learn, 1, [SkipEveryThird(), ema, rec])
    assert ema.n_steps == ema.n_updates == len(rec.states) == 11   # 16 batches, 5 skipped
    assert_close(ema.weights(), manual_ema(rec.states, ema.decay_at, float_keys(learn)))
    learn = digits_learner(path=tmp_path/'acc')
    ema = EMA(decay=0.9)
    fit(learn, 1, [GradientAccumulation(n_acc=128), ema])
    assert ema.n_steps == 8   # two batches of 64 per step

def test_to_fp16(tmp_path):
    learn, rec = digits_learner(path=tmp_path).to_fp16(), Record()
    ema = EMA(decay=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # autocast('cuda') on a CPU: disabled with a warning, the callbacks still run
        fit(learn, 1, [ema, rec])
    assert ema.n_steps == len(rec.states) > 0
    assert_close(ema.weights(), manual_ema(rec.states, ema.decay_at, float_keys(learn)))

def test_export_and_load_learner(tmp_path):
    learn, df = tabular(tmp_path)   # a Learner fastai can export (the digits' TensorDatasets cannot be emptied)
    learn.export('plain.pkl')
    ema = EMA(decay=0.9)
    learn.add_cb(ema)
    fit(learn, 1, [])
    assert ema.n_updates == len(learn.dls.train)
    learn.export('with_ema.pkl')
    assert not tensors_in({k: v for k, v in ema.__getstate__().items() if k != 'learn'})   # what export pickles of it: no EMA tensors
    loaded = load_learner(tmp_path/'with_ema.pkl')
    cb = next(c for c in loaded.cbs if isinstance(c, EMACallback))
    assert cb.weights() is None and cb.n_updates == 0 and cb.decay == 0.9
    assert ema.n_updates == len(learn.dls.train) and ema.weights() is not None   # exporting left the attached EMA as it was
    with loaded.no_bar(): loaded.predict(df.iloc[0])
    assert cb.n_updates == 0

def test_lr_find_validate_get_preds_change_nothing(tmp_path):
    learn = digits_learner(path=tmp_path)
    ema = EMA(decay=0.9, save_as='ema')
    learn.add_cb(ema)
    fit(learn, 1, [])
    before = (ema.n_updates, ema.n_steps, ema.weights())
    (folder(learn)/'ema.pth').unlink()
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=5, show_plot=False); learn.validate(); learn.get_preds()
    assert (ema.n_updates, ema.n_steps) == before[:2] and states_equal(ema.weights(), before[2])
    assert not (folder(learn)/'ema.pth').exists()

def test_fine_tune_one_ema_or_restart(tmp_path):
    for restart, steps in ((False, 16*3), (True, 16*2)):
        learn, rec = digits_learner(path=tmp_path/str(restart)), Record()
        ema = EMA(decay=0.9, restart=True) if restart else EMA(decay=0.9)   # the default: one EMA across both fits
        fit(learn, 2, [ema, rec], fn='fine_tune')   # freeze_epochs=1, then 2 epochs
        assert ema.n_steps == steps
        assert ema.weights().keys() == learn.model.state_dict().keys()
        states = rec.states if not restart else rec.states[-steps:]
        assert_close(ema.weights(), manual_ema(states, ema.decay_at, float_keys(learn)))

def test_save_as_loads_and_is_recorded(tmp_path):
    learn = digits_learner(path=tmp_path)
    ema = EMA(decay=0.9, save_as='ema')
    fit(learn, 2, [SaveEvery(epochs=1), ema])
    learn.load('ema', with_opt=False)
    assert states_equal(state(learn.model), ema.weights())
    [rec] = Manifest(folder(learn), 'ckpt').averages
    assert rec['file'] == 'ema.pth' and rec['strategy'] == 'ema' and rec['fit'] == 1 and rec['details']['n_updates'] == 32
    assert rec['inputs'] == [] and rec['bytes'] == (folder(learn)/'ema.pth').stat().st_size

def test_sidecars_follow_with_opt_saves_and_rotation(tmp_path):
    learn = digits_learner(path=tmp_path)
    fit(learn, 4, [SaveEvery(epochs=1, with_opt=True, keep=2), EMA(decay=0.9)])
    assert sorted(p.name for p in folder(learn).glob('*.ema.pt')) == ['ckpt_f001_s0003.ema.pt', 'ckpt_f001_s0004.ema.pt']
    learn = digits_learner(path=tmp_path/'no_opt')
    fit(learn, 1, [SaveEvery(epochs=1), EMA(decay=0.9)])
    assert list(folder(learn).glob('*.ema.pt')) == []   # resuming needs the optimizer state: no sidecar without it

def _fit_no_shuffle(learn, n, cbs):
    learn.dls.train.shuffle = False   # a fresh Learner would restart the shuffling's random state
    fit(learn, n, cbs)

def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(decay=0.9, every=5)  # 16 steps an epoch: the resumed fit must carry the count of steps between updates
    whole = digits_learner(path=tmp_path/'whole')
    ema_whole = EMA(**kw)
    _fit_no_shuffle(whole, 6, [ema_whole])

    first = digits_learner(path=tmp_path/'run')
    _fit_no_shuffle(first, 3, [SaveEvery(epochs=3, with_opt=True), EMA(**kw)])
    resumed = digits_learner(path=tmp_path/'run')
    for p in resumed.model.parameters(): p.data.normal_()   # everything must come from the files
    resumed.load('ckpt_f001_s0001', with_opt=True)
    ema = EMA(**kw, resume_from='ckpt_f001_s0001')
    _fit_no_shuffle(resumed, 3, [ema])
    assert ema.n_steps == ema_whole.n_steps == 96 and ema.n_updates == ema_whole.n_updates == 19
    assert states_equal(state(resumed.model), state(whole.model))
    assert states_equal(ema.weights(), ema_whole.weights())   # bit for bit

def test_bad_arguments_and_resume_errors_before_training(tmp_path):
    for kw, msg in [(dict(decay=1.0), 'decay=1.0'), (dict(every=1.5), 'every=1.5'), (dict(buffers='all'), "buffers='all'"),
                    (dict(device='nowhere'), "device='nowhere'"), (dict(start_at='soon'), "start_at='soon'"),
                    (dict(save_as='../x'), "save_as='../x'"), (dict(warmup_power=-1), 'warmup_power=-1')]:
        with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace('.', r'\.')): EMA(**kw)
    learn = digits_learner(path=tmp_path)
    w = state(learn.model)
    with pytest.raises(FileNotFoundError, match='ckpt_f009_s0001.ema.pt does not exist'):
        fit(learn, 1, [EMA(resume_from='ckpt_f009_s0001')])
    other = EMA()
    other.load_state_dict(dict(ema={'weight': torch.zeros(3)}, n_updates=1, n_steps=1))
    with pytest.raises(ValueError, match='weights of another model'): fit(learn, 1, [other])
    assert states_equal(state(learn.model), w)   # refused before any step
    with pytest.raises(ValueError, match='not an EMA state'): other.load_state_dict({'weight': torch.zeros(3)})
    assert sidecar_name('ckpt_f001_s0002') == 'ckpt_f001_s0002.ema.pt'
