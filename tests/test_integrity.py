"Integrity: a checkpoint whose bytes changed after it was saved is caught before averaging, named, or skipped on request"
import shutil, warnings
from pathlib import Path
import pytest, torch
from fastai.callback.core import Callback
from ckpt_avg.save import SaveEvery, SaveEveryNCallback
from ckpt_avg.average import AverageLast
from ckpt_avg.core import average_checkpoints
from ckpt_avg.manifest import Manifest, IntegrityError
from ckpt_avg.demo import digits_learner
from helpers import fit, state, states_equal, folder, flip


def truncate(path):
    b = path.read_bytes(); path.write_bytes(b[:len(b)//2])
def replace(path):  # another checkpoint of the same model: same size, other weights
    shutil.copyfile(sorted(path.parent.glob('ckpt_f001_s*.pth'))[-1], path)
def remove(path): path.unlink()

DAMAGE = dict(flip=(flip, 'does not match the hash'), truncate=(truncate, 'but the manifest recorded'),
              replace=(replace, 'does not match the hash'), remove=(remove, 'is missing'))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A folder with 4 saves of one digits fit"
    path = tmp_path_factory.mktemp('trained')
    fit(digits_learner(path=path), 4, [SaveEvery(epochs=1)])
    return path

@pytest.fixture
def copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path/'run')
    return tmp_path/'run'


def test_torch_load_misses_a_flipped_byte(copy):
    "Why we hash: the CRC32 torch.save writes is not checked by torch.load"
    f = copy/'models'/'ckpt_f001_s0001.pth'
    before = torch.load(f, weights_only=True)
    flip(f)
    after = torch.load(f, weights_only=True)  # loads without complaint...
    assert not states_equal(before, after)    # ...with different weights


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_average_checkpoints_names_the_damaged_file(copy, damage):
    do, msg = DAMAGE[damage]
    do(copy/'models'/'ckpt_f001_s0002.pth')
    with pytest.raises(IntegrityError, match=f'ckpt_f001_s0002.pth .*{msg}'):
        average_checkpoints(copy/'models')
    # an undamaged selection still averages
    average_checkpoints(copy/'models', k=2)


class Damage(Callback):
    "After the last epoch's save (before AverageLast runs), damage the first save of this fit; remember the final weights"
    order = SaveEveryNCallback.order + 0.5
    def __init__(self, do): self.do = do
    def after_epoch(self):
        if self.epoch == self.n_epoch-1:
            saver = next(cb for cb in self.learn.cbs if isinstance(cb, SaveEveryNCallback))
            self.final = state(self.model)
            self.do(saver.manifest.file(saver.saved[0]))


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_average_last_refuses_a_damaged_checkpoint_and_keeps_the_final_weights(copy, damage):
    do, msg = DAMAGE[damage]
    learn = digits_learner(path=copy)
    dmg = Damage(do)
    with pytest.raises(IntegrityError, match=f'ckpt_f002_s0001.pth .*{msg}.*skip_corrupt=True'):
        fit(learn, 3, [SaveEvery(epochs=1), dmg, AverageLast(3)])
    assert states_equal(state(learn.model), dmg.final)
    assert not (folder(learn)/'ckpt_f002_avg.pth').exists()
    assert Manifest(folder(learn)).data['averages'] == []


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_skip_corrupt_warns_and_averages_the_good_files(copy, damage):
    do, msg = DAMAGE[damage]
    learn = digits_learner(path=copy)
    with pytest.warns(UserWarning, match=f'ckpt_f002_s0001.pth .*{msg}.*left out of the average'):
        fit(learn, 3, [SaveEvery(epochs=1), Damage(do), AverageLast(3, skip_corrupt=True)])
    good = [folder(learn)/f'ckpt_f002_s000{i}.pth' for i in (2, 3)]
    assert states_equal(state(learn.model), average_checkpoints(good))
    avg = Manifest(folder(learn)).data['averages'][-1]
    assert avg['inputs'] == ['ckpt_f002_s0002.pth', 'ckpt_f002_s0003.pth']


def test_scope_all_checks_earlier_fits_too(copy):
    flip(copy/'models'/'ckpt_f001_s0004.pth')
    learn = digits_learner(path=copy)
    before = state(learn.model)
    with pytest.raises(IntegrityError, match='ckpt_f001_s0004.pth does not match'):
        fit(learn, 1, [AverageLast(2, scope='all', save_as=None)])
    with pytest.warns(UserWarning, match='ckpt_f001_s0004.pth does not match'):
        fit(learn, 1, [AverageLast(2, scope='all', save_as=None, skip_corrupt=True)])
    assert states_equal(state(learn.model), average_checkpoints([copy/'models'/'ckpt_f001_s0003.pth']))
    assert not states_equal(state(learn.model), before)


def test_a_manifest_listing_an_average_as_a_checkpoint_is_refused(copy):
    learn = digits_learner(path=copy)
    fit(learn, 2, [SaveEvery(epochs=1), AverageLast(2)])
    m = Manifest(folder(learn))
    avg = m.data['averages'][-1]
    m.checkpoints.append(dict(file=avg['file'], fit=avg['fit'], bytes=avg['bytes'], hash=avg['hash']))
    m.write()
    with pytest.raises(ValueError, match='ckpt_f002_avg.pth among its checkpoints, but records it as an average'):
        average_checkpoints(folder(learn))
    with pytest.raises(ValueError, match='would count twice'):
        average_checkpoints([folder(learn)/'ckpt_f002_s0002.pth', folder(learn)/'ckpt_f002_avg.pth'])


# ---------------------------------------------------------------------------------------------------------------
# Untrusted files: a checkpoint that would run code when unpickled is refused by every door, and runs nothing

import os, pickle
from ckpt_avg.core import CheckpointError, load_state
from ckpt_avg.manifest import file_hash

class RunsCode:
    "Unpickling this calls exec, which writes `marker`"
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))

class CreatesFile:
    "Unpickling this calls os.system to create `marker`"
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))

PAYLOADS = dict(exec=RunsCode, system=CreatesFile)

def malicious(path, payload, marker, like):
    "A file that looks like the fastai checkpoint `like` (same weights) but carries `payload`"
    sd = torch.load(like, weights_only=True)
    torch.save({'model': sd, 'opt': payload(marker)}, path)
    return path

@pytest.mark.parametrize('payload', list(PAYLOADS))
def test_the_malicious_file_really_runs_code_with_a_plain_torch_load(copy, payload, tmp_path):
    "The control: the payload works, so the refusals below are not refusals of a harmless file"
    marker = tmp_path/'ran'
    f = malicious(tmp_path/'evil.pth', PAYLOADS[payload], marker, copy/'models'/'ckpt_f001_s0001.pth')
    torch.load(f, weights_only=False)
    assert marker.exists()

def plant(copy, payload, marker):
    "Put a malicious file in place of the newest checkpoint, and make the manifest vouch for it (an attacker with write access)"
    d = copy/'models'
    f = malicious(d/'ckpt_f001_s0004.pth', PAYLOADS[payload], marker, d/'ckpt_f001_s0004.pth')
    m = Manifest(d)
    m.checkpoints[-1].update(bytes=f.stat().st_size, hash=file_hash(f))
    m.write()
    return f

@pytest.mark.parametrize('payload', list(PAYLOADS))
def test_average_checkpoints_refuses_it(copy, payload, tmp_path):
    marker = tmp_path/'ran'
    f = plant(copy, payload, marker)
    with pytest.raises(CheckpointError, match='refused to load .*ckpt_f001_s0004.pth'):
        average_checkpoints([copy/'models'/'ckpt_f001_s0003.pth', f])
    with pytest.raises(CheckpointError, match='refused to load .*ckpt_f001_s0004.pth'):
        average_checkpoints(copy/'models')  # the manifest lists it, with a matching hash
    with pytest.raises(CheckpointError, match='refused'): load_state(f)
    assert not marker.exists()

@pytest.mark.parametrize('payload', list(PAYLOADS))
def test_average_last_refuses_it_and_keeps_the_final_weights(copy, payload, tmp_path):
    marker = tmp_path/'ran'
    plant(copy, payload, marker)
    learn = digits_learner(path=copy)
    class Final(Callback):
        def after_epoch(self): self.state = state(self.model)
    fin = Final()
    with pytest.raises(CheckpointError, match='refused to load .*ckpt_f001_s0004.pth'):
        fit(learn, 1, [AverageLast(2, scope='all'), fin])
    assert not marker.exists()
    assert states_equal(state(learn.model), fin.state)
    assert not list((copy/'models').glob('*avg*'))

def _cli_has(cmd):
    from ckpt_avg.cli import make_parser
    sub = next(a for a in make_parser()._actions if a.dest == '==SUPPRESS==' or getattr(a, 'choices', None))
    return cmd in (sub.choices or {})

@pytest.mark.parametrize('payload', list(PAYLOADS))
def test_the_command_line_refuses_it(copy, payload, tmp_path, capsys):
    if not _cli_has('average'): pytest.skip('this ckpt_avg has no `average` command yet')
    from ckpt_avg.cli import main
    marker, out = tmp_path/'ran', tmp_path/'avg.pth'
    f = plant(copy, payload, marker)
    assert main(['average', str(copy/'models'/'ckpt_f001_s0003.pth'), str(f), '-o', str(out)]) == 1
    assert 'refused to load' in capsys.readouterr().err
    assert main(['average', str(copy/'models'), '-o', str(out)]) == 1
    assert not marker.exists() and not out.exists()

def test_safetensors_inputs_need_no_pickle(copy, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    files = []
    for i in (3, 4):
        sd = torch.load(copy/'models'/f'ckpt_f001_s000{i}.pth', weights_only=True)
        files.append(tmp_path/f'w{i}.safetensors'); save_file(sd, files[-1])
    try: load_state(files[0])
    except CheckpointError: pytest.skip('this ckpt_avg does not read safetensors yet')
    def no_pickle(*a, **k): raise AssertionError('a safetensors input was unpickled')
    import sys, torch._weights_only_unpickler as wou
    unpicklers = [wou.Unpickler] + [c for m in list(sys.modules.values()) if getattr(m, '__name__', '').startswith('ckpt_avg')
                                    for c in vars(m).values() if isinstance(c, type) and issubclass(c, pickle.Unpickler)]
    for c in unpicklers: monkeypatch.setattr(c, 'load', no_pickle)  # every unpickler torch or ckpt_avg could use
    for mod, name in ((pickle, 'load'), (pickle, 'loads'), (pickle, 'Unpickler')): monkeypatch.setattr(mod, name, no_pickle)
    avg = average_checkpoints(files)
    monkeypatch.undo()
    assert states_equal(avg, average_checkpoints([copy/'models'/'ckpt_f001_s0003.pth', copy/'models'/'ckpt_f001_s0004.pth']))
