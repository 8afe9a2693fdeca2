"""One plan for every door: `ckpt_avg average` on a folder, files or a glob, `--dry-run`, `average_checkpoints` and
`average_to_file` on files or a folder all verify what a manifest vouches for, refuse an average mixed with its
inputs, and check weights by one rule, before anything is read or written"""
import contextlib, io, math, shutil, warnings
from pathlib import Path
import pytest, torch
from ckpt_avg.core import average_checkpoints, average_to_file, plan_average
from ckpt_avg.cli import main
from ckpt_avg.manifest import Manifest, IntegrityError
from ckpt_avg.demo import digits_learner
from ckpt_avg.save import SaveEvery
from ckpt_avg.average import AverageLast
from helpers import states_equal, flip


def learn_save(path):
    "`learn.save` over a checkpoint: another, valid fastai file (with optimizer state) under the checkpoint's name"
    learn = digits_learner(path=path.parent.parent, seed=3)
    learn.save(path.stem)

DAMAGE = dict(flip=(flip, 'does not match the hash the manifest recorded'), learn_save=(learn_save, 'but the manifest recorded'))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "models/ with 4 saves of fit 1 and ckpt_f001_avg.pth, their average of the last 2, recorded by AverageLast"
    path = tmp_path_factory.mktemp('trained')
    learn = digits_learner(path=path)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(4, 0.1, cbs=[SaveEvery(epochs=1), AverageLast(2)])
    return path

@pytest.fixture
def models(trained, tmp_path):
    shutil.copytree(trained, tmp_path/'run')
    return tmp_path/'run'/'models'

def saves(models, *ns): return [models/f'ckpt_f001_s{n:04d}.pth' for n in ns]

def run(*args):
    "`ckpt_avg ARGS` in this process: (exit code, stdout, stderr)"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()

def doors(models, out):
    "Every way to ask for an average of saves 1-4 (in the folder, saves 1-4 are all its checkpoints)"
    files = saves(models, 1, 2, 3, 4)
    cli = lambda *a: run('average', *a, '-o', out)
    return {
        'cli folder': lambda: cli(models),
        'cli files': lambda: cli(*files),
        'cli glob': lambda: cli(models/'ckpt_f001_s*.pth'),
        'cli folder --dry-run': lambda: cli(models, '--dry-run'),
        'cli files --dry-run': lambda: cli(*files, '--dry-run'),
        'average_checkpoints folder': lambda: average_checkpoints(models),
        'average_checkpoints files': lambda: average_checkpoints(files),
        'average_to_file files': lambda: average_to_file(files, out),
    }

def refused(call, fragment, exc=ValueError):
    "`call` (a door) refuses: a CLI door exits 1 naming the problem, a function raises `exc` naming it"
    try: res = call()
    except exc as e:
        assert fragment in str(e), str(e)
        return str(e)
    code, stdout, err = res
    assert code == 1 and fragment in err, (code, stdout, err)
    return err


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_every_door_refuses_a_changed_checkpoint(models, damage, tmp_path):
    do, problem = DAMAGE[damage]
    do(models/'ckpt_f001_s0002.pth')
    out = tmp_path/'avg.pth'
    for name, call in doors(models, out).items():
        msg = refused(call, problem, IntegrityError)
        assert 'ckpt_f001_s0002.pth' in msg, (name, msg)
        assert not out.exists(), name
    # files no manifest lists are read as they are: a copy of the damaged file elsewhere averages
    (tmp_path/'loose').mkdir()
    loose = [shutil.copy(f, tmp_path/'loose') for f in saves(models, 2, 3)]
    assert average_checkpoints(loose)


def test_a_changed_average_is_refused_too(models):
    "The averages a manifest records are vouched for like its checkpoints"
    flip(models/'ckpt_f001_avg.pth')
    with pytest.raises(IntegrityError, match='ckpt_f001_avg.pth does not match the hash'):
        average_checkpoints([models/'ckpt_f001_avg.pth'])
    code, _, err = run('average', models/'ckpt_f001_avg.pth', models/'ckpt_f001_s0001.pth', '-o', models.parent/'x.pth', '--dry-run')
    assert code == 1 and 'ckpt_f001_avg.pth does not match the hash' in err, err


def test_an_average_with_its_inputs_is_refused_by_every_door(models, tmp_path):
    files = saves(models, 3, 4) + [models/'ckpt_f001_avg.pth']
    out = tmp_path/'avg.pth'
    calls = {'cli files': lambda: run('average', *files, '-o', out), 'cli dry-run': lambda: run('average', *files, '-o', out, '--dry-run'),
             'cli glob': lambda: run('average', models/'ckpt_f001_*.pth', '-o', out),
             'average_checkpoints': lambda: average_checkpoints(files), 'average_to_file': lambda: average_to_file(files, out)}
    for name, call in calls.items():
        msg = refused(call, 'would count twice')
        assert 'ckpt_f001_avg.pth is the average of ckpt_f001_s0003.pth, ckpt_f001_s0004.pth' in msg, (name, msg)
    assert not out.exists()


BAD_WEIGHTS = {'inf,1': 'inf is not finite', 'nan,1': 'nan is not a number', '-1,2': '-1.0 is negative', '0,0': 'they sum to 0'}

@pytest.mark.parametrize('weights', list(BAD_WEIGHTS))
def test_bad_weights_are_refused_by_every_door(models, weights, tmp_path):
    files, out = saves(models, 3, 4), tmp_path/'avg.pth'
    w = [float(x) for x in weights.split(',')]
    for call in (lambda: run('average', *files, '-o', out, f'--weights={weights}'),
                 lambda: run('average', *files, '-o', out, f'--weights={weights}', '--dry-run'),
                 lambda: run('average', models, '--last', '2', '-o', out, f'--weights={weights}'),
                 lambda: average_checkpoints(files, weights=w), lambda: average_to_file(files, out, weights=w),
                 lambda: average_checkpoints(models, k=2, weights=w)):
        msg = refused(call, BAD_WEIGHTS[weights])
        assert 'every weight must be a finite number >= 0 and at least one > 0' in msg, msg
    assert not out.exists()
    with pytest.raises(ValueError, match='every weight must be a finite number >= 0'):  # AverageLast, before training
        AverageLast(2, strategy='weighted', weights=w)


def test_huge_weights_give_the_exact_mean_not_zeros(models, tmp_path):
    "1e308 + 1e308 overflows to inf: normalising by that sum would make every weight 0, and the model all zeros"
    files, out = saves(models, 3, 4), tmp_path/'avg.pth'
    plain = average_checkpoints(files)
    assert states_equal(average_checkpoints(files, weights=[1e308, 1e308]), plain)
    assert run('average', *files, '-o', out, '--weights', '1e308,1e308')[0] == 0
    assert states_equal(torch.load(out), plain)
    first, alone = average_checkpoints(files, weights=[1e308, 0]), average_checkpoints(files[:1])
    assert all(torch.equal(first[k], alone[k]) for k in first if first[k].is_floating_point())  # integer buffers: the newest file's


def test_dry_run_refuses_what_the_real_run_refuses(models, tmp_path):
    files, out = saves(models, 3, 4), tmp_path/'avg.pth'
    torch.save({'other.weight': torch.zeros(3)}, tmp_path/'other.pth')
    out.write_bytes(b'precious')
    cases = [((*files, '-o', out), 'already exists; pass --force'),
             ((files[0], tmp_path/'other.pth', '-o', tmp_path/'new.pth'), 'these checkpoints are of different models'),
             ((*files, '-o', tmp_path/'new.pth', '--weights', '1'), 'one weight per checkpoint'),
             ((*files, '-o', tmp_path/'no_folder'/'avg.pth'), 'no_folder does not exist')]
    for args, msg in cases:
        for dry in ([], ['--dry-run']):
            code, _, err = run('average', *args, *dry)
            assert code == 1 and msg in err, (args, dry, code, err)
    assert out.read_bytes() == b'precious' and not (tmp_path/'new.pth').exists()


def test_dry_run_says_what_would_be_averaged(models, tmp_path):
    code, out, err = run('average', models, '--last', '2', '-o', tmp_path/'avg.pth', '--dry-run', '--weights', '1,3')
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(str(models/'ckpt_f001_s0003.pth')) and 'state_dict' in lines[0] and 'weight 0.25' in lines[0]
    assert lines[1].startswith(str(models/'ckpt_f001_s0004.pth')) and 'weight 0.75' in lines[1]
    assert all('size and hash checked' in l for l in lines[:2]), lines
    assert 'the last 2 checkpoints in ' + str(models/'ckpt_manifest.json') in out, out
    assert 'would average these 2 checkpoints into ' + str(tmp_path/'avg.pth') in out
    assert not (tmp_path/'avg.pth').exists()
    # files no manifest lists are said to be read as they are
    (tmp_path/'loose').mkdir()
    loose = [shutil.copy(f, tmp_path/'loose') for f in saves(models, 3, 4)]
    code, out, err = run('average', *loose, '--dry-run')
    assert code == 0 and out.count('in no manifest: read as it is') == 2, (out, err)


def test_an_average_written_again_is_vouched_for_by_its_latest_record(models):
    "Averaging into the same file twice (--force) records it twice: the latest record is the one its bytes must match"
    for last in ('2', '3'):
        assert run('average', models, '--last', last, '-o', models/'mine.pth', '--force')[0] == 0
    plan = plan_average([models/'mine.pth'])
    assert plan.checked == [True]
    flip(models/'mine.pth')
    with pytest.raises(IntegrityError, match='mine.pth does not match the hash'): plan_average([models/'mine.pth'])


def test_the_command_line_uses_only_public_functions_and_walks_no_manifest():
    "The CLI plans through `plan_average` like every other door: no private import, no manifest of its own"
    import ast, ckpt_avg.cli as cli
    source = Path(cli.__file__).read_text()
    imports = [(n.module, a.name) for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and (n.module or '').startswith('ckpt_avg')
               for a in n.names]
    assert not [i for i in imports if i[1].startswith('_')], imports
    assert 'Manifest' not in {name for _, name in imports} and not any(f'.{m}(' in source for m in ('live', 'last', 'verify')), imports
