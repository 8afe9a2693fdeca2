"""The notebooks are the documentation: they must run where a user reads them, with a plain `pip install ckpt_avg` and
the newest fastai, no nbdev. In the dev environment `nbdev_test` runs them; here each runs in a real Jupyter kernel,
skipping the cells nbdev_test skips (`#| notest`, `#| eval: false`)"""
import importlib.util, json, re, sys
from pathlib import Path
import nbformat, pytest
from nbclient import NotebookClient

NBS = Path(__file__).parent.parent/'nbs'
SKIP = re.compile(r'^\s*#\|\s*(notest|eval:\s*false)\s*$', re.M)
pytestmark = pytest.mark.skipif(importlib.util.find_spec('nbdev') is not None,
                                reason="nbdev is installed: tools/test_all.sh runs the notebooks with nbdev_test there")

@pytest.fixture(scope='module')
def kernel_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('jupyter')
    (d/'kernels'/'ckpt-avg-docs').mkdir(parents=True)
    (d/'kernels'/'ckpt-avg-docs'/'kernel.json').write_text(json.dumps(dict(
        argv=[sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'], display_name='ckpt_avg docs', language='python')))
    return d

@pytest.mark.parametrize('name', sorted(p.name for p in NBS.glob('*.ipynb')))
def test_notebook_runs_without_nbdev(name, tmp_path, monkeypatch, kernel_dir):
    monkeypatch.setenv('JUPYTER_PATH', str(kernel_dir))
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    nb = nbformat.read(NBS/name, as_version=4)
    if re.search(r'^import .*\bnumba\b|^from numba', '\n'.join(c.source for c in nb.cells if c.cell_type == 'code'), re.M) and importlib.util.find_spec('numba') is None:
        pytest.skip(f"{name} shows the optional numba kernel: pip install 'ckpt_avg[numba]' to run it")
    nb.cells = [c for c in nb.cells if not (c.cell_type == 'code' and SKIP.search(c.source))]
    NotebookClient(nb, timeout=600, kernel_name='ckpt-avg-docs', resources={'metadata': {'path': str(NBS)}}).execute()
