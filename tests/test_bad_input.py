"""Bad input: every case raises an error that names the problem and the fix, before anything changes on disk or in the model.

`CASES` is also what `nbs/28_safety.ipynb` runs to build its table of messages, so the table shows the real messages.
Each case is (what is wrong, setup code, the call, a fragment the message must contain). The setup runs first (it
may damage the folder on purpose); then the folder and the model are snapshotted, the call must raise, and both
must be unchanged. The code runs in a namespace with: `learn` (a digits Learner whose `models/` holds 4 saves of
fit 1 and their average `ckpt_f001_avg.pth` of the last 2), `models` (that folder), `fit(cbs)` (one epoch with
those callbacks), `edit(fn)` (apply `fn` to the manifest's JSON), `cli(args)` (the command line; returns its code).
"""
import contextlib, io, json, shutil, warnings
from pathlib import Path
import torch
from torch import nn

CASES = [
    # SaveEvery, checked when it is built
    ("SaveEvery without a trigger", None, "SaveEvery()", "needs a trigger"),
    ("SaveEvery with a zero interval", None, "SaveEvery(epochs=0)", "epochs=0: pass a positive int"),
    ("SaveEvery with a fractional epoch count", None, "SaveEvery(epochs=1.5)", "epochs=1.5: pass a positive int"),
    ("SaveEvery with a bool for a count", None, "SaveEvery(batches=True)", "batches=True: pass a positive int"),
    ("SaveEvery keeping a negative number of files", None, "SaveEvery(epochs=1, keep=-1)", "keep=-1"),
    ("SaveEvery with a path as fname", None, "SaveEvery(epochs=1, fname='../ckpt')", "pass a plain file name stem"),
    # AverageLast, checked when it is built
    ("AverageLast of zero checkpoints", None, "AverageLast(0)", "k=0: pass the number of checkpoints"),
    ("AverageLast with an unknown scope", None, "AverageLast(5, scope='last')", "scope='last': pass 'fit'"),
    ("AverageLast saving into another folder", None, "AverageLast(5, save_as='out/avg')", "save_as='out/avg': pass a file name"),
    # conflicting callbacks, checked in before_fit: before the first batch
    ("keep= smaller than AverageLast's k", None, "fit([SaveEvery(epochs=1, keep=2), AverageLast(5)])", "keep=2 would delete checkpoints that AverageLast(5) needs"),
    ("AverageLast of this fit without a SaveEvery", None, "fit([AverageLast(3)])", "there is no SaveEvery(fname='ckpt')"),
    ("two SaveEvery writing one manifest", None, "fit([SaveEvery(epochs=1), SaveEvery(batches=3)])", "two SaveEvery callbacks with fname='ckpt'"),
    ("AverageLast would replace an existing file", None, "fit([SaveEvery(epochs=1), AverageLast(3, save_as='ckpt_f001_s0001')])", "already exists and AverageLast would replace it"),
    ("AverageLast(scope='all') with nothing saved", None, "fit([AverageLast(3, fname='other', scope='all')])", "has nothing to average"),
    # manifests edited by hand
    ("a manifest of a newer schema version", "edit(lambda m: m.update(version=99))", "fit([SaveEvery(epochs=1)])", "upgrade ckpt_avg"),
    ("a manifest that is not ours", "edit(lambda m: m.update(schema='other'))", "average_checkpoints(models)", "is not a ckpt_avg manifest"),
    ("a manifest broken by a hand edit", "(models/'ckpt_manifest.json').write_text('{\"schema\": ')", "fit([AverageLast(3, scope='all')])", "is not valid JSON"),
    ("a manifest naming a file outside its folder", "edit(lambda m: m['checkpoints'][-1].update(file='../../etc/passwd'))", "average_checkpoints(models)", "may only name files in its own folder"),
    ("a manifest listing the average as a checkpoint", "edit(lambda m: m['checkpoints'].append(dict(m['averages'][0])))", "average_checkpoints(models)", "records it as an average"),
    ("a checkpoint changed after it was saved", "flip(models/'ckpt_f001_s0004.pth')", "average_checkpoints(models)", "ckpt_f001_s0004.pth does not match the hash"),
    # average_checkpoints
    ("k=0", None, "average_checkpoints(models, k=0)", "k=0: pass an int >= 1"),
    ("an empty list of files", None, "average_checkpoints([])", "no checkpoint files to average"),
    ("a file that does not exist", None, "average_checkpoints(models/'nope.pth')", "does not exist"),
    ("a folder without a manifest", "(models/'empty').mkdir()", "average_checkpoints(models/'empty')", "has no ckpt_manifest.json"),
    ("too few weights", None, "average_checkpoints([models/'ckpt_f001_s0001.pth', models/'ckpt_f001_s0002.pth'], weights=[1])", "got 1 weights for 2 checkpoints"),
    ("a negative weight", None, "average_checkpoints([models/'ckpt_f001_s0001.pth', models/'ckpt_f001_s0002.pth'], weights=[1, -1])", "weights must be >= 0"),
    ("checkpoints of different models", "torch.save(nn.Linear(3, 2).state_dict(), models/'other.pth')", "average_checkpoints([models/'ckpt_f001_s0001.pth', models/'other.pth'])", "different models"),
    ("a file that is not a checkpoint", "(models/'notes.txt').write_text('not weights')", "average_checkpoints([models/'ckpt_f001_s0001.pth', models/'notes.txt'])", "is not a checkpoint: it is neither a zip archive"),
    ("a pickle that holds no weights", "torch.save([1, 2, 3], models/'list.pth')", "average_checkpoints([models/'list.pth'])", "not a model's weights"),
    ("an average fed back in with its own inputs", None, "average_checkpoints([models/'ckpt_f001_s0003.pth', models/'ckpt_f001_s0004.pth', models/'ckpt_f001_avg.pth'])", "would count twice"),
    # every door checks what a manifest vouches for, the averages it records and the weights, by one plan
    ("a changed checkpoint in a list of files", "flip(models/'ckpt_f001_s0004.pth')", "average_checkpoints([models/'ckpt_f001_s0003.pth', models/'ckpt_f001_s0004.pth'])", "ckpt_f001_s0004.pth does not match the hash"),
    ("a recorded average changed after it was saved", "flip(models/'ckpt_f001_avg.pth')", "average_checkpoints([models/'ckpt_f001_avg.pth'])", "ckpt_f001_avg.pth does not match the hash"),
    ("a weight that is not finite", None, "average_checkpoints([models/'ckpt_f001_s0001.pth', models/'ckpt_f001_s0002.pth'], weights=[float('inf'), 1])", "inf is not finite"),
    ("weights that are all zero", None, "average_checkpoints(models, k=2, weights=[0, 0])", "they sum to 0"),
    ("ckpt_avg average on a folder with a changed checkpoint", "flip(models/'ckpt_f001_s0004.pth')", "cli(['average', str(models), '-o', str(models/'x.pth')])", "ckpt_f001_s0004.pth does not match the hash"),
    ("ckpt_avg average --dry-run on a glob with a changed checkpoint", "flip(models/'ckpt_f001_s0004.pth')", "cli(['average', str(models/'ckpt_f001_s*.pth'), '--dry-run'])", "ckpt_f001_s0004.pth does not match the hash"),
    ("ckpt_avg average of an average and its inputs", None, "cli(['average', str(models/'ckpt_f001_s0003.pth'), str(models/'ckpt_f001_s0004.pth'), str(models/'ckpt_f001_avg.pth'), '-o', str(models/'x.pth')])", "would count twice"),
    ("ckpt_avg average with a weight that is not a number", None, "cli(['average', str(models), '--last', '2', '-o', str(models/'x.pth'), '--weights', 'nan,1'])", "nan is not a number"),
    ("ckpt_avg average --dry-run onto an existing file", "(models/'x.pth').write_bytes(b'mine')", "cli(['average', str(models), '-o', str(models/'x.pth'), '--dry-run'])", "already exists; pass --force"),
    # the command line
    ("ckpt_avg demo: more saves to average than epochs", None, "cli(['demo', '--epochs', '3', '--k', '5'])", "--k 5 averages 5 saves, but --epochs 3"),
    ("ckpt_avg demo: a count that is not a number", None, "cli(['demo', '--epochs', 'many'])", "'many' is not a whole number"),
]


def flip(path):
    "Flip one byte in the middle of `path`"
    b = bytearray(path.read_bytes()); b[len(b)//2] ^= 0xff; path.write_bytes(bytes(b))

def make_base(path):
    "The folder every case starts from: 4 saves of fit 1 and the average of the last 2"
    from ckpt_avg.demo import digits_learner
    from ckpt_avg.save import SaveEvery
    from ckpt_avg.average import AverageLast
    learn = digits_learner(path=path)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(4, 0.1, cbs=[SaveEvery(epochs=1), AverageLast(2)])
    return Path(path)

class CliError(Exception): "The command line returned a non-zero code; the message is what it printed"

def namespace(path):
    "What the cases' code can use, for a fresh copy of the base folder at `path`"
    from ckpt_avg.demo import digits_learner
    from ckpt_avg.save import SaveEvery
    from ckpt_avg.average import AverageLast
    from ckpt_avg.core import average_checkpoints
    from ckpt_avg.cli import main
    learn = digits_learner(path=path, seed=1)
    models = Path(path)/'models'
    def fit(cbs):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1, cbs=cbs)
    def edit(fn):
        p = models/'ckpt_manifest.json'; m = json.loads(p.read_text()); fn(m); p.write_text(json.dumps(m))
    def cli(args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()): code = main(args)
        if code: raise CliError(err.getvalue().strip().splitlines()[-1])
        return code
    return dict(learn=learn, models=models, fit=fit, edit=edit, cli=cli, flip=flip, SaveEvery=SaveEvery, AverageLast=AverageLast,
                average_checkpoints=average_checkpoints, torch=torch, nn=nn, json=json)

def snapshot(path, learn):
    files = {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(path).rglob('*'))}
    return files, {k: v.clone() for k, v in learn.model.state_dict().items()}

def message(e):
    "The exception's message without the line fastai adds in front of errors raised in callbacks"
    msg = str(e)
    return msg.split('\n', 1)[1].strip() if msg.startswith('Exception occured in `') and '\n' in msg else msg

def run_case(base, path, setup, call):
    "Run one case in a copy of `base` at `path`; return (error type, message); assert it changed nothing"
    shutil.copytree(base, path)
    ns = namespace(path)
    if setup: exec(setup, ns)
    files, weights = snapshot(path, ns['learn'])
    try: exec(call, ns)
    except Exception as e: err = e
    else: raise AssertionError(f"{call} did not raise")
    files2, weights2 = snapshot(path, ns['learn'])
    assert files2 == files, f"{call} changed the folder: {sorted(set(files2) ^ set(files)) or 'file contents'}"
    assert weights2.keys() == weights.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights), f"{call} changed the model"
    return type(err).__name__, message(err)


# ---------------------------------------------------------------------------------------------------------------
import pytest

@pytest.fixture(scope='module')
def base(tmp_path_factory): return make_base(tmp_path_factory.mktemp('base'))

@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_before_anything_changes(base, tmp_path, case):
    what, setup, call, fragment = case
    kind, msg = run_case(base, tmp_path/'run', setup, call)
    assert fragment in msg, f"{what}: {kind}: {msg}"

def test_enough_cases():
    assert len(CASES) >= 15
