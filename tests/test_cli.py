"`ckpt_avg average` and `ckpt_avg info` run as a shell user runs them: in a subprocess, judged by exit code, files and messages"
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from fastai.learner import save_model
from fastai.optimizer import Adam
from ckpt_avg.core import average_checkpoints
from ckpt_avg.formats import read_checkpoint, write_checkpoint
from ckpt_avg.manifest import Manifest, file_hash
from ckpt_avg.save import SaveEvery
from ckpt_avg.demo import digits_learner

ROOT = Path(__file__).parents[1]


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'ckpt_avg.cli', *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def fastai_saves(folder, k=4):
    "k fastai files with optimizer state, of a model with a BatchNorm"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))
    opt = Adam(model.parameters(), lr=1e-2)
    files = []
    for i in range(k):
        model(torch.randn(16, 5)).sum().backward(); opt.step(); opt.zero_grad()
        files.append(folder/f's{i}.pth')
        save_model(files[-1], model, opt, with_opt=True)
    return files


def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_folder_last_k_from_a_real_training_run(tmp_path):
    learn = digits_learner(path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(4, 1e-2, cbs=SaveEvery(epochs=1))
    models = tmp_path/'models'
    m = Manifest(models)
    last2 = [m.file(e) for e in m.last(2)]
    r = cli('average', models, '--last', '2', '-o', models/'avg.pth')
    assert r.returncode == 0, r.stderr
    assert 'averaged 2 checkpoints' in r.stdout
    assert same(read_checkpoint(models/'avg.pth').state, average_checkpoints(last2))
    rec = Manifest(models).data['averages'][-1]  # recorded in the manifest, with the bytes' hash
    assert rec['inputs'] == [f.name for f in last2] and rec['hash'] == file_hash(models/'avg.pth')
    learn.load('avg')  # fastai loads the output
    r = cli('average', models, '--last', '9', '-o', models/'avg9.pth')
    assert r.returncode == 1 and 'more checkpoints than the 4 available; pass --last 4 or less' in r.stderr
    assert not (models/'avg9.pth').exists()


def test_files_glob_formats_and_dry_run(tmp_path):
    files = fastai_saves(tmp_path)
    ref = average_checkpoints(files)
    r = cli('average', tmp_path/'s*.pth', '-o', tmp_path/'avg.safetensors')
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file
    assert same(load_file(tmp_path/'avg.safetensors'), ref)
    r = cli('average', *files, '-o', tmp_path/'avg.pt', '--format', 'fairseq')
    assert r.returncode == 0 and same(torch.load(tmp_path/'avg.pt')['model'], ref)
    r = cli('average', *files, '-o', tmp_path/'dry.pth', '--dry-run')
    assert r.returncode == 0 and not (tmp_path/'dry.pth').exists()
    assert r.stdout.count('fastai +optimizer') == 4 and 'would average these 4 checkpoints' in r.stdout


def test_existing_output_is_kept_unless_force(tmp_path):
    files = fastai_saves(tmp_path)
    out = tmp_path/'avg.pth'
    out.write_bytes(b'precious')
    r = cli('average', *files, '-o', out)
    assert r.returncode == 1 and 'already exists; pass --force' in r.stderr
    assert out.read_bytes() == b'precious'
    assert cli('average', *files, '-o', out, '--force').returncode == 0
    assert same(read_checkpoint(out).state, average_checkpoints(files))
    r = cli('average', *files, '-o', files[-1], '--force')  # never over an input
    assert r.returncode == 2 and 'is one of the inputs' in r.stderr


def test_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path):
    files = fastai_saves(tmp_path, 2)
    class Evil:
        def __reduce__(self): return (os.system, (f'touch {tmp_path}/PWNED',))
    torch.save({'w': torch.zeros(2), 'x': Evil()}, tmp_path/'evil.pth')
    for cmd in (['average', files[0], tmp_path/'evil.pth', '-o', tmp_path/'out.pth'], ['info', tmp_path/'evil.pth']):
        r = cli(*cmd, cwd=tmp_path)
        assert r.returncode == 1 and 'refused to load' in r.stderr and 'evil.pth' in r.stderr, r.stderr
    assert not (tmp_path/'PWNED').exists() and not (tmp_path/'out.pth').exists()


def test_bad_inputs_have_clear_messages_and_nonzero_codes(tmp_path):
    files = fastai_saves(tmp_path, 2)
    torch.save({'other.weight': torch.zeros(3)}, tmp_path/'other.pth')
    write_checkpoint(read_checkpoint(files[0]).state, tmp_path/'same.safetensors', 'safetensors')
    (tmp_path/'empty').mkdir()
    b = files[1].read_bytes()
    (tmp_path/'cut.pth').write_bytes(b[:len(b)//2])
    cases = [
        (['average', files[0], tmp_path/'other.pth', '-o', tmp_path/'o.pth'], 1, 'these checkpoints are of different models'),
        (['average', tmp_path/'empty', '-o', tmp_path/'o.pth'], 1, 'has no ckpt_manifest.json'),
        (['average', tmp_path/'nothing*.pth', '-o', tmp_path/'o.pth'], 1, 'no file matches'),
        (['average', files[0], tmp_path/'cut.pth', '-o', tmp_path/'o.pth'], 1, 'cut.pth looks like a torch file but cannot be read'),
        (['average', files[0], tmp_path/'missing.pth', '-o', tmp_path/'o.pth'], 1, 'missing.pth does not exist'),
        (['average', *files, '-o', tmp_path/'o.pth', '--weights', '1'], 1, 'one weight per checkpoint'),
        (['average', *files], 2, 'pass -o/--output'),
        (['average', *files, '-o', tmp_path/'o.pth', '--format', 'onnx'], 2, "invalid choice: 'onnx'"),
        (['average', *files, '-o', tmp_path/'o.pth', '--fit', '1'], 2, '--fit picks saves from a folder'),
        (['info', tmp_path/'cut.pth'], 1, 'cut.pth looks like a torch file but cannot be read'),
    ]
    for args, code, msg in cases:
        r = cli(*args)
        assert r.returncode == code and msg in r.stderr, (args, r.returncode, r.stderr)
    assert not (tmp_path/'o.pth').exists()
    # mixed formats with the same keys are fine
    assert cli('average', files[0], tmp_path/'same.safetensors', '-o', tmp_path/'o.pth').returncode == 0


def test_info_describes_each_file(tmp_path):
    files = fastai_saves(tmp_path, 1)
    sd = {'a': torch.zeros(4, dtype=torch.bfloat16), 'b': torch.zeros(2, 3)}
    write_checkpoint(sd, tmp_path/'w.safetensors', 'safetensors')
    torch.save({'state_dict': {'model.'+k: v for k, v in sd.items()}, 'pytorch-lightning_version': '2.5', 'optimizer_states': []}, tmp_path/'pl.ckpt')
    r = cli('info', files[0], tmp_path/'w.safetensors', tmp_path/'pl.ckpt')
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert 'format: fastai, with optimizer state' in out and 'float32: 8 tensors' in out and 'int64: 1 tensor, 8 B' in out
    assert 'format: safetensors, no optimizer state' in out and 'bfloat16: 1 tensor, 8 B' in out
    assert 'format: lightning, with optimizer state' in out
    r = cli('info', tmp_path/'pl.ckpt', '--strip-prefix', 'net.')
    assert r.returncode == 1 and "no key of" in r.stderr


def test_averaging_path_does_not_import_fastai(tmp_path):
    files = fastai_saves(tmp_path, 2)
    code = ("import sys; from ckpt_avg.cli import main; "
            f"rc = main(['average', {str(files[0])!r}, {str(files[1])!r}, '-o', {str(tmp_path/'o.pth')!r}]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastai', 'fastprogress', 'sklearn', 'matplotlib'})); sys.exit(rc)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and r.stdout.strip().endswith('[]'), (r.stdout, r.stderr)


def test_a_changed_checkpoint_is_refused_from_the_folder_files_glob_and_dry_run(tmp_path):
    "The README's promise, from the shell: sizes and hashes are checked before averaging, whichever way the files are given"
    learn = digits_learner(path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2, cbs=SaveEvery(epochs=1))
    models = tmp_path/'models'
    f = models/'ckpt_f001_s0002.pth'
    b = bytearray(f.read_bytes()); b[-200] ^= 1; f.write_bytes(bytes(b))  # one bit of the last tensor's bytes
    files = sorted(models.glob('ckpt_f001_s*.pth'))
    for inputs in ([models], files, [models/'ckpt_f001_s*.pth']):
        for dry in ([], ['--dry-run']):
            r = cli('average', *inputs, '-o', tmp_path/'avg.pth', *dry)
            assert r.returncode == 1 and f'{f} does not match the hash the manifest recorded' in r.stderr, (inputs, dry, r.stderr)
    assert not (tmp_path/'avg.pth').exists()
    r = cli('average', *files[:1], files[-1], '-o', tmp_path/'avg.pth')  # the good ones still average
    assert r.returncode == 0 and 'averaged 2 checkpoints (files as given; sizes and hashes checked)' in r.stdout, r.stderr
