#!/usr/bin/env python3
"""Run notebooks in a real Jupyter kernel and store their outputs, so the pages read on the repository show what a user sees.

The cells run are those `nbdev_test` runs: cells with `#| eval: false`, a test flag from settings.ini's `tst_flags`
(`#| notest`) or a call to `nbdev_export(` are kept as they are, without outputs. The kernel is an ipykernel of the Python
that runs this script, in the notebook's folder, with this checkout first on its path (nbclient, as
tests/test_course_notebook.py). A notebook whose cell fails is not written. Afterwards run `nbdev_clean`, which keeps
outputs (`clear_all = False`) and drops execution counts and metadata.

    .venv-test/bin/python tools/run_notebooks.py                    # every notebook in nbs/
    .venv-test/bin/python tools/run_notebooks.py nbs/18_save.ipynb  # some of them
"""
import argparse, configparser, json, os, re, sys, tempfile, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
KERNEL = 'ckpt-avg-docs'
_directive = re.compile(r'^\s*#\|\s*([\w-]+):?\s*(.*?)\s*$')

def _skip_flags()->set:
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    return set(cfg['DEFAULT'].get('tst_flags', '').split())

def _skipped(cell, flags)->bool:
    "Is `cell` a code cell that nbdev_test would not run?"
    if 'nbdev_export' + '(' in cell.source: return True
    for line in cell.source.splitlines():
        m = _directive.match(line)
        if not m: break
        name, value = m.groups()
        if name == 'eval' and value.lower() == 'false' or name in flags: return True
    return False

def _kernel_dir(d:Path)->Path:
    "A kernelspec that starts this Python (its venv), whatever other kernels the machine has"
    spec = d/'kernels'/KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec/'kernel.json').write_text(json.dumps(dict(argv=[sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
                                                    display_name='ckpt_avg docs', language='python')))
    return d

def run(path:Path, flags:set)->bool:
    "Run `path`'s cells as nbdev_test would, in a kernel, and write it back with their outputs; False if a cell fails"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    held = [c for c in code if _skipped(c, flags)]
    for c in code: c.outputs, c.execution_count = [], None
    for c in held: c.cell_type = 'raw'; del c['outputs'], c['execution_count']  # nbclient runs code cells only
    client, started = NotebookClient(nb, timeout=900, kernel_name=KERNEL, resources={'metadata': {'path': str(path.parent)}}), time.monotonic()
    try: client.execute()
    except Exception as e:
        print(f"{path.name}: a cell failed\n{str(e)[-3000:]}", file=sys.stderr)
        return False
    finally:
        for c in held: c.cell_type, c.outputs, c.execution_count = 'code', [], None
    nbformat.write(nb, path)
    print(f"{path.name}: {time.monotonic()-started:.0f} s")
    return True

def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('notebooks', nargs='*', help='notebooks to run (default: every one in nbs/)')
    args = p.parse_args(argv)
    paths = [Path(n).resolve() for n in args.notebooks] or sorted((ROOT/'nbs').glob('*.ipynb'))
    flags, failed = _skip_flags(), []
    with tempfile.TemporaryDirectory() as d:
        os.environ['JUPYTER_PATH'] = str(_kernel_dir(Path(d)))
        os.environ['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p])
        # importing fastai makes torch warn that torch.jit.script is deprecated: fastai's business, not the page's
        os.environ['PYTHONWARNINGS'] = 'ignore::FutureWarning:torch.jit._script'
        for path in paths:
            if not run(path, flags): failed.append(path.name)
    if failed: print(f"not written, a cell failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0

if __name__ == '__main__': sys.exit(main())
