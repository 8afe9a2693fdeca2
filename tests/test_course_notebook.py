"""Course-style notebooks run in a real Jupyter kernel (nbclient): the callbacks attached to the Learner through
lr_find, fine_tune, validate, predict, show_results, interpretation, summary, export and load_learner, with fastai's
SaveModelCallback as the control; a tabular regression judged by rmse; to_fp16 and to_bf16 fits"""
import json, sys
from pathlib import Path
import nbformat, pytest
from nbclient import NotebookClient

HERE = Path(__file__).parent/'notebooks'
KERNEL = 'ckpt-avg-tests'

@pytest.fixture(scope='module')
def kernel_dir(tmp_path_factory):
    "A kernelspec that starts this Python (its venv, its PYTHONPATH), whatever other kernels the machine has"
    d = tmp_path_factory.mktemp('jupyter')
    spec = d/'kernels'/KERNEL
    spec.mkdir(parents=True)
    (spec/'kernel.json').write_text(json.dumps(dict(argv=[sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
                                                    display_name='ckpt_avg tests', language='python')))
    return d

def run_notebook_file(path, tmp_path, monkeypatch, kernel_dir, parameters=None):
    "Execute the notebook at `path` in a fresh kernel, the first code cell replaced by `parameters`; keep the result in `tmp_path`"
    monkeypatch.setenv('JUPYTER_PATH', str(kernel_dir))
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    nb = nbformat.read(path, as_version=4)
    if parameters is not None: next(c for c in nb.cells if c.cell_type == 'code').source = parameters
    client = NotebookClient(nb, timeout=600, kernel_name=KERNEL, resources={'metadata': {'path': str(tmp_path)}})
    try: client.execute()
    finally: nbformat.write(nb, tmp_path/f'executed_{Path(path).name}')  # with its outputs, to read when a cell fails
    return nb

def run_notebook(name, tmp_path, monkeypatch, kernel_dir, parameters=None):
    "Execute tests/notebooks/`name` (see `run_notebook_file`)"
    return run_notebook_file(HERE/name, tmp_path, monkeypatch, kernel_dir, parameters)

def printed(nb)->str:
    return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))

def test_vision_course_with_ckpt_avg(tmp_path, monkeypatch, kernel_dir):
    nb = run_notebook('course_vision.ipynb', tmp_path, monkeypatch, kernel_dir, "MODE = 'ckpt_avg'")
    out = printed(nb)
    for step in ('lr_find', 'validate', 'predict', 'show_results', 'ClassificationInterpretation.from_learner',
                 'get_preds', 'summary', 'export', 'predict with the loaded Learner'):
        assert f'{step}: weights unchanged bit for bit, no file written' in out, step
    assert 'AverageLast: averaged' in out

def test_vision_course_with_fastai_control(tmp_path, monkeypatch, kernel_dir):
    "The same notebook with fastai's SaveModelCallback: the control every step above is held to"
    nb = run_notebook('course_vision.ipynb', tmp_path, monkeypatch, kernel_dir, "MODE = 'fastai'")
    assert 'export and load_learner: same weights, same prediction' in printed(nb)

def test_tabular_rmse_and_mixed_precision(tmp_path, monkeypatch, kernel_dir):
    nb = run_notebook('course_tabular.ipynb', tmp_path, monkeypatch, kernel_dir)
    out = printed(nb)
    assert out.count('the model holds the') == 3
    assert 'three fits, three averages' in out

def test_the_command_in_a_notebook_cell_prints_one_line_no_frames(tmp_path, monkeypatch, kernel_dir):
    "`!ckpt_avg average ...` in a cell: no animated bar (the kernel's pseudo-terminal would keep every frame), one closing line"
    from ckpt_avg.demo import digits_learner
    learn = digits_learner(path=tmp_path)
    from ckpt_avg.save import SaveEvery
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 0.1, cbs=[SaveEvery(epochs=1)])
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(f"!{sys.executable} -m ckpt_avg.cli average {tmp_path/'models'} --last 3 -o {tmp_path/'avg.pth'}"))
    nbformat.write(nb, tmp_path/'cli.ipynb')
    out = printed(run_notebook_file(tmp_path/'cli.ipynb', tmp_path, monkeypatch, kernel_dir)).replace('\r\n', '\n')  # the pty's line ends
    assert (tmp_path/'avg.pth').exists(), out
    assert '\r' not in out and '%' not in out, repr(out)
    assert out.strip().count('\n') == 0 and out.startswith('averaged 3 checkpoints'), repr(out)
