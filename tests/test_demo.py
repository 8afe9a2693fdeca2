"`ckpt_avg demo` as a user runs it from the shell, and `from ckpt_avg.all import *`"
import hashlib, re, shutil, subprocess, sys, tempfile
from pathlib import Path
import pytest

def ckpt_avg(*args):
    "Run this venv's `ckpt_avg` console script with `args`"
    script = Path(sys.executable).with_name('ckpt_avg')
    assert script.exists(), f"no {script}: `pip install -e .` puts the ckpt_avg command next to python"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=600)

def table(out):
    "The (valid loss, accuracy) of the final weights and of the average, as printed by the demo"
    rows = {}
    for name in ('final weights', 'average of last'):
        m = re.search(rf'^{name}.*?\s(\d+\.\d+)\s+(\d+\.\d+)%$', out, re.M)
        assert m, f"no '{name}' row in the demo's table:\n{out}"
        rows[name] = float(m[1]), float(m[2])
    return rows

def digest(p): return hashlib.sha256(p.read_bytes()).hexdigest()

def test_demo(tmp_path):
    r = ckpt_avg('demo', '--epochs', '3', '--k', '2', '--path', str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert 'final weights (epoch 3)' in r.stdout and 'average of last 2 saves' in r.stdout
    for loss, acc in rows.values(): assert loss > 0 and 0 <= acc <= 100
    assert rows['final weights'] != rows['average of last'], "the average should differ from the final weights"
    models = tmp_path/'models'
    assert f'are in {models}' in r.stdout
    assert len(list(models.glob('ckpt_f001_s*.pth'))) == 3, sorted(models.iterdir())
    assert list(models.glob('*manifest*.json')), sorted(models.iterdir())

def test_demo_again_replaces_nothing(tmp_path):
    assert ckpt_avg('demo', '--epochs', '2', '--k', '2', '--path', str(tmp_path)).returncode == 0
    models = tmp_path/'models'
    before = {p.name: digest(p) for p in models.glob('*.pth')}
    r = ckpt_avg('demo', '--epochs', '1', '--k', '1', '--path', str(tmp_path))
    assert r.returncode == 0, r.stderr
    after = {p.name: digest(p) for p in models.glob('*.pth')}
    assert {n: after.get(n) for n in before} == before, "a second run changed the first run's files"
    assert len(after) > len(before)

def test_demo_default_folder():
    r = ckpt_avg('demo', '--epochs', '1', '--k', '1')
    assert r.returncode == 0, r.stderr
    m = re.search(r'are in (.+)$', r.stdout, re.M)
    assert m, r.stdout
    models = Path(m[1])
    try:
        assert models.name == 'models' and models.parent.name.startswith('ckpt_avg_demo_')
        assert models.parent.parent == Path(tempfile.gettempdir()).resolve() or models.parent.parent == Path(tempfile.gettempdir())
        assert list(models.glob('*.pth'))
    finally: shutil.rmtree(models.parent, ignore_errors=True)

@pytest.mark.parametrize('args, message', [
    (['demo', '--epochs', '3', '--k', '5'], '--k 5 averages 5 saves, but --epochs 3'),
    (['demo', '--epochs', '0'], '--epochs: 0 is too small'),
    (['demo', '--k', 'five'], "'five' is not a whole number"),
    (['averag'], "invalid choice: 'averag'"),
    ([], 'required: COMMAND'),
])
def test_wrong_command_line(tmp_path, args, message):
    r = ckpt_avg(*args, '--path', str(tmp_path)) if args[:1] == ['demo'] else ckpt_avg(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr, r.stderr
    assert 'usage: ckpt_avg' in r.stderr
    assert not list(tmp_path.iterdir()), "a refused command line must not create files"

def test_work_failure_exits_1(tmp_path):
    (tmp_path/'models').mkdir()
    (tmp_path/'models'/'ckpt_manifest.json').write_text('{"not": "a ckpt_avg manifest"}')
    r = ckpt_avg('demo', '--epochs', '1', '--k', '1', '--path', str(tmp_path))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert re.search(r'^ckpt_avg: error: .*ckpt_manifest\.json', r.stderr, re.M), r.stderr
    assert 'Traceback' not in r.stderr

def test_all_names():
    ns = {}
    exec('from ckpt_avg.all import *', ns)
    from ckpt_avg import save, average, core
    for name, module in [('SaveEveryNCallback', save), ('AverageCheckpointsCallback', average), ('SaveEvery', save),
                         ('AverageLast', average), ('average_checkpoints', core)]:
        assert ns.get(name) is getattr(module, name), name
    assert 'digits_learner' in ns and 'run_demo' in ns
