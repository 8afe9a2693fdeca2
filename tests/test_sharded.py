"Checkpoint folders in and out: transformers shards, Trainer checkpoint-N, accelerate, DCP; exactness, checks, memory"
import importlib.util, json, os, subprocess, sys, warnings
from pathlib import Path
import pytest, torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from ckpt_avg.core import average_checkpoints, average_to_file, plan_average
from ckpt_avg.files import CheckpointError
from ckpt_avg.sharded import read_folder, write_sharded

ROOT = Path(__file__).parents[1]


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'ckpt_avg.cli', *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def model_state(seed):
    "Weights of several dtypes and an integer buffer"
    g = torch.Generator().manual_seed(seed)
    return {'embed.weight': torch.randn(40, 8, generator=g), 'layers.0.weight': torch.randn(8, 8, generator=g).bfloat16(),
            'layers.0.bias': torch.randn(8, generator=g).half(), 'layers.1.weight': torch.randn(8, 8, generator=g, dtype=torch.float64),
            'head.weight': torch.randn(3, 8, generator=g), 'norm.num_batches_tracked': torch.tensor(seed)}


SHARDS = [['embed.weight'], ['layers.0.weight', 'layers.0.bias', 'layers.1.weight'], ['head.weight', 'norm.num_batches_tracked']]


def hf_folder(folder, state, shards=SHARDS, bin=False, config=True):
    "A folder as save_pretrained writes it, written with the safetensors package (or torch.save for .bin shards)"
    folder.mkdir(parents=True)
    n, weight_map = len(shards), {}
    for i, keys in enumerate(shards):
        name = f'pytorch_model-{i+1:05d}-of-{n:05d}.bin' if bin else f'model-{i+1:05d}-of-{n:05d}.safetensors'
        part = {k: state[k] for k in keys}
        if bin: torch.save(part, folder/name)
        else: save_file(part, folder/name, metadata={'format': 'pt'})
        weight_map.update({k: name for k in keys})
    index = 'pytorch_model.bin.index.json' if bin else 'model.safetensors.index.json'
    (folder/index).write_text(json.dumps(dict(metadata={}, weight_map=weight_map)))
    if config: (folder/'config.json').write_text(json.dumps({'model_type': 'toy', 'seed': str(folder)}))
    return folder


def mean_of(states):
    "float64 mean rounded once to each dtype; integer tensors from the newest"
    return {k: (sum(s[k].double() for s in states)/len(states)).to(v.dtype) if v.is_floating_point() else v for k, v in states[-1].items()}


def read_sharded(folder):
    "A sharded safetensors folder, read with the safetensors package through its index"
    index = json.loads((folder/'model.safetensors.index.json').read_text())
    files = {name: load_file(folder/name) for name in set(index['weight_map'].values())}
    return {k: files[name][k] for k, name in index['weight_map'].items()}, index


def same(a, b): return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def trainer_run(out, steps=(500, 900, 1000, 1500)):
    "A Trainer output_dir: checkpoint-N folders with weights, config, and optimizer files that are not weights"
    for i, step in enumerate(steps):
        d = hf_folder(out/f'checkpoint-{step}', model_state(i))
        for junk in ('optimizer.pt', 'scheduler.pt', 'rng_state.pth'): (d/junk).write_bytes(b'not read')
        (d/'trainer_state.json').write_text('{"global_step": %d}' % step)
        (d/'tokenizer.json').write_text('{}')
    return [model_state(i) for i in range(len(steps))]


def test_sharded_safetensors_average_is_exact(tmp_path):
    states = [model_state(i) for i in range(3)]
    folders = [hf_folder(tmp_path/f'm{i}', s) for i, s in enumerate(states)]
    res = average_to_file(folders, tmp_path/'avg', out_format='sharded', max_shard_size=1000)
    got, index = read_sharded(tmp_path/'avg')
    assert same(got, mean_of([read_sharded(f)[0] for f in folders]))  # the inputs, as the safetensors package reads them
    assert res['tensors'] == len(states[0]) and res['shards'] == len(set(index['weight_map'].values())) > 1
    assert same(average_checkpoints(folders), got)


def test_bin_shards_average_is_exact(tmp_path):
    states = [model_state(i) for i in range(3)]
    folders = [hf_folder(tmp_path/f'm{i}', s, bin=True) for i, s in enumerate(states)]
    ref = []
    for f in folders:  # the reference reader: torch.load of every shard the index lists
        wm = json.loads((f/'pytorch_model.bin.index.json').read_text())['weight_map']
        ref.append({k: torch.load(f/name, weights_only=True)[k] for k, name in wm.items()})
    assert same(average_checkpoints(folders), mean_of(ref))


@pytest.mark.parametrize('damage, message', [
    (lambda d, wm: wm.update({'head.weight': 'model-00009-of-00009.safetensors'}), 'missing from'),
    (lambda d, wm: wm.pop('head.weight'), "which model.safetensors.index.json does not list"),
    (lambda d, wm: wm.update({'ghost': wm['head.weight']}), "puts 'ghost' in model-00003-of-00003.safetensors"),
    (lambda d, wm: wm.update({'x': '../m0/model-00001-of-00003.safetensors'}), 'not a file of its folder'),
    (lambda d, wm: (d/'model-00002-of-00003.safetensors').unlink(), 'missing from'),
])
def test_index_and_shards_must_agree(tmp_path, damage, message):
    d = hf_folder(tmp_path/'m', model_state(0))
    index = json.loads((d/'model.safetensors.index.json').read_text())
    damage(d, index['weight_map'])
    (d/'model.safetensors.index.json').write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=None) as e: read_folder(d)
    assert message in str(e.value) and str(d) in str(e.value)


def test_index_listing_a_tensor_twice_is_refused(tmp_path):
    d = hf_folder(tmp_path/'m', model_state(0))
    text = (d/'model.safetensors.index.json').read_text()
    (d/'model.safetensors.index.json').write_text(text.replace('"weight_map": {', '"weight_map": {"head.weight": "model-00001-of-00003.safetensors", '))
    with pytest.raises(CheckpointError, match='listed twice'): read_folder(d)


def test_trainer_checkpoints_by_step_and_config_copied(tmp_path):
    states = trainer_run(tmp_path/'out')
    plan = plan_average(tmp_path/'out', k=2)
    assert [f.name for f in plan.files] == ['checkpoint-1000', 'checkpoint-1500']  # by name, 900 would come after 1500
    r = cli('average', tmp_path/'out'/'checkpoint-*', '--last', 3, '-o', tmp_path/'avg', '--max-shard-size', '500B')
    assert r.returncode == 0, r.stderr
    got, index = read_sharded(tmp_path/'avg')
    assert same(got, mean_of(states[1:]))
    record = index['metadata']['ckpt_avg']
    assert record['copied_from'] == str(tmp_path/'out'/'checkpoint-1500') and set(record['copied']) == {'config.json', 'tokenizer.json'}
    assert (tmp_path/'avg'/'config.json').read_text() == (tmp_path/'out'/'checkpoint-1500'/'config.json').read_text()
    assert [p for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temporary folder left


def test_shards_respect_max_shard_size(tmp_path):
    folders = [hf_folder(tmp_path/f'm{i}', model_state(i)) for i in range(2)]
    average_to_file(folders, tmp_path/'avg', out_format='sharded', max_shard_size=600)
    got, index = read_sharded(tmp_path/'avg')
    by_shard = {}
    for k, name in index['weight_map'].items(): by_shard.setdefault(name, []).append(got[k].numel()*got[k].element_size())
    assert len(by_shard) > 2
    assert all(sum(sizes) <= 600 or len(sizes) == 1 for sizes in by_shard.values())  # a larger tensor: a shard of its own
    assert index['metadata']['total_size'] == sum(map(sum, by_shard.values()))


def test_existing_output_refused_unless_overwrite(tmp_path):
    folders = [hf_folder(tmp_path/f'm{i}', model_state(i)) for i in range(2)]
    (tmp_path/'avg').mkdir(); (tmp_path/'avg'/'keep').write_text('mine')
    with pytest.raises(FileExistsError, match='already exists'): average_to_file(folders, tmp_path/'avg', out_format='sharded')
    state = model_state(0)
    with pytest.raises(FileExistsError, match='already exists'):
        write_sharded({k: (t.dtype, tuple(t.shape)) for k, t in state.items()}, state.items(), tmp_path/'avg')
    assert (tmp_path/'avg'/'keep').read_text() == 'mine'
    r = cli('average', *folders, '-o', tmp_path/'avg')
    assert r.returncode == 1 and 'already exists' in r.stderr
    average_to_file(folders, tmp_path/'avg', out_format='sharded', overwrite=True)
    assert not (tmp_path/'avg'/'keep').exists() and same(read_sharded(tmp_path/'avg')[0], mean_of([model_state(0), model_state(1)]))


def test_accelerate_folder_model_zero_unless_told(tmp_path):
    for i in range(2):
        d = tmp_path/f'acc{i}'; d.mkdir()
        save_file(model_state(i), d/'model.safetensors'); save_file(model_state(10+i), d/'model_1.safetensors')
        (d/'optimizer.bin').write_bytes(b'not read'); (d/'random_states_0.pkl').write_bytes(b'not read')
    c = read_folder(tmp_path/'acc0')
    assert c.kind == 'accelerate' and c.has_opt and same(c.state, model_state(0))
    assert same(read_folder(tmp_path/'acc1', model=1).state, model_state(11))
    assert same(average_checkpoints([tmp_path/'acc0', tmp_path/'acc1']), mean_of([model_state(0), model_state(1)]))


def dcp_save(state, folder):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dcp.save({'model': state, 'optim': {'step': torch.ones(2)}}, checkpoint_id=str(folder), no_dist=True)


def dcp_read(folder, like):
    out = {k: torch.empty_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dcp.load(out, checkpoint_id=str(folder), no_dist=True)
    return out


def test_dcp_round_trip(tmp_path):
    states = [model_state(i) for i in range(3)]
    for i, s in enumerate(states): dcp_save(s, tmp_path/f'dcp{i}')
    folders = [tmp_path/f'dcp{i}' for i in range(3)]
    average_to_file(folders, tmp_path/'avg', out_format='dcp', strip_prefix='model.')
    assert same(dcp_read(tmp_path/'avg', states[0]), mean_of(states))
    r = cli('average', *folders, '-o', tmp_path/'avg_cli', '--strip-prefix', 'model.')  # DCP inputs: a DCP output by default
    assert r.returncode == 0, r.stderr
    assert same(dcp_read(tmp_path/'avg_cli', states[0]), mean_of(states))
    assert cli('average', *folders, '-o', tmp_path/'avg.pth', '--strip-prefix', 'model.').returncode == 0  # a torch file, asked by name
    assert same(torch.load(tmp_path/'avg.pth', weights_only=True), mean_of(states))
    average_to_file(folders, tmp_path/'avg_st', out_format='sharded', strip_prefix='model.')
    assert same(read_sharded(tmp_path/'avg_st')[0], mean_of(states))


def test_mixed_kinds_refused(tmp_path):
    dcp_save(model_state(0), tmp_path/'dcp')
    hf = hf_folder(tmp_path/'hf', model_state(1))
    torch.save(model_state(2), tmp_path/'one.pth')
    with pytest.raises(CheckpointError, match='of one kind'): plan_average([tmp_path/'dcp', hf])
    with pytest.raises(CheckpointError, match='not a checkpoint folder'): plan_average([hf, tmp_path/'one.pth'])
    r = cli('average', tmp_path/'dcp', hf, '-o', tmp_path/'avg')
    assert r.returncode == 1 and 'of one kind' in r.stderr and not (tmp_path/'avg').exists()


@pytest.mark.skipif(importlib.util.find_spec('transformers') is None, reason='transformers is not installed')
def test_average_loads_with_from_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv('USE_HUB_KERNELS', 'NO')  # transformers 5 otherwise wants the `kernels` package to load any model
    import transformers
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    for i in range(2):
        torch.manual_seed(i)
        transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path/f'checkpoint-{i+1}', max_shard_size='20KB')
    res = average_to_file(tmp_path, tmp_path/'avg', out_format='sharded', max_shard_size='20KB')
    assert res['shards'] > 1
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path/'avg')
    ref = mean_of([transformers.GPT2LMHeadModel.from_pretrained(tmp_path/f'checkpoint-{i+1}').state_dict() for i in range(2)])
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


CHILD = """
import re, sys, torch
from pathlib import Path
from ckpt_avg.core import average_to_file
status = lambda field: int(re.search(field + r':\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024
Path('/proc/self/clear_refs').write_text('5')  # the high-water mark restarts from here: after `import torch`
base = status('VmRSS')
average_to_file(sys.argv[1:-1], sys.argv[-1], out_format='sharded', max_shard_size='50MB')
print(base, status('VmHWM'))
"""


def run_child(script, *args):
    "Run `script` in a fresh process, on this checkout, with one torch thread"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-c', script, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def peak_rss(*args):
    "(resident bytes after importing torch and ckpt_avg, peak resident bytes while averaging) of a fresh process"
    r = run_child(CHILD, *args)
    assert r.returncode == 0, r.stderr
    return tuple(map(int, r.stdout.split()[-2:]))


@pytest.mark.skipif(not Path('/proc/self/clear_refs').exists(), reason="needs Linux's /proc to reset the peak resident memory")
def test_memory_stays_well_under_one_model(tmp_path):
    # The resident peak past the resident memory after `import torch` (peak reset there) is what the average keeps;
    # the tests below hold the average to an enforced limit instead (RLIMIT_DATA, a memory cgroup).
    per_tensor, shards = 3_125_000, [[f'layers.{s}.{j}.weight' for j in range(4)] for s in range(4)]  # 16 x 12.5 MB = 200 MB
    folders = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        state = {k: torch.randn(per_tensor, generator=g) for keys in shards for k in keys}
        folders.append(hf_folder(tmp_path/f'checkpoint-{i}', state, shards))
        del state
    model = 16 * per_tensor * 4
    base, peak = peak_rss(*folders, tmp_path/'avg')
    assert len(list((tmp_path/'avg').glob('*.safetensors'))) == 4
    print(f"model {model/1e6:.0f} MB, K=3: peak {peak/1e6:.0f} MB, import torch {base/1e6:.0f} MB, net {(peak-base)/model:.2f} x model")
    assert peak - base < 0.5 * model


LIMITED = """
import os, re, resource, sys, torch
from pathlib import Path
from safetensors.torch import load_file
from ckpt_avg.core import average_checkpoints, average_to_file, plan_average
status = lambda field: int(re.search(field + r':\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024
limit, action, out, ins = sys.argv[1], sys.argv[2], Path(sys.argv[3]), [Path(a) for a in sys.argv[4:]]
plan = plan_average(ins)  # maps every input whole, private and writable: RLIMIT_DATA counts that, so limits start here
kind, value = limit.split(':', 1)
if kind == 'data':
    data = status('VmData') + int(value)  # from here on the process may take `value` more bytes
    resource.setrlimit(resource.RLIMIT_DATA, (data, data))
else:
    for f in (p for d in ins for p in ([d] if d.is_file() else d.iterdir())):  # out of the page cache: read again, under the limit
        fd = os.open(f, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
    Path(value, 'cgroup.procs').write_text(str(os.getpid()))
try: exec(action)
except (MemoryError, RuntimeError) as e: sys.exit(f"refused: {type(e).__name__}: {str(e).splitlines()[0]}")
"""


def under_limit(limit, action, out, inputs):
    "A fresh process that plans `inputs`, is then held to `limit` ('data:BYTES' or 'cgroup:FOLDER') and runs `action`"
    return run_child(LIMITED, limit, action, out, *inputs)


def big_model(seed, tensors=16, numel=1_000_000):
    "16 x 4 MB float32 tensors: a 64 MB model"
    g = torch.Generator().manual_seed(seed)
    return {f'layers.{i}.weight': torch.randn(numel, generator=g) for i in range(tensors)}


BIG_SHARDS = [[f'layers.{i}.weight' for i in range(s, s+4)] for s in range(0, 16, 4)]
IN_MEMORY = "kept = average_checkpoints(plan)"  # the control: the same average, held in memory (one model of its own)
SHARDED = "average_to_file(plan, out, out_format='sharded', max_shard_size='20MB')"


@pytest.fixture(scope='module')
def big_folders(tmp_path_factory):
    "Three sharded safetensors folders of a 64 MB model, and the model's size"
    tmp = tmp_path_factory.mktemp('big')
    folders = [hf_folder(tmp/f'checkpoint-{i}', big_model(i), BIG_SHARDS) for i in range(3)]
    return folders, sum(f.stat().st_size for f in folders[0].glob('*.safetensors'))


def check_against_shards(got, folders):
    "`got` equals the float64 mean of `folders`, computed shard by shard with the safetensors package"
    for name in sorted(p.name for p in folders[0].glob('*.safetensors')):
        ref = mean_of([load_file(f/name) for f in folders])
        assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="RLIMIT_DATA counts private writable mappings on Linux only")
def test_average_under_a_data_limit_below_one_model(tmp_path, big_folders):
    # RLIMIT_DATA (Linux >= 4.7) counts a process's private writable and anonymous memory, not read-only file mappings.
    # Our readers map each input whole, privately and writable (as torch.load(mmap=True) does), so that counts too: the
    # child plans first, then allows itself half a model more. RLIMIT_AS cannot be used: torch maps gigabytes at import.
    folders, model = big_folders
    limit = f'data:{model//2}'
    r = under_limit(limit, IN_MEMORY, None, folders)
    assert r.returncode == 1 and 'refused' in r.stderr, r.stderr
    r = under_limit(limit, SHARDED, tmp_path/'avg', folders)
    assert r.returncode == 0, r.stderr
    check_against_shards(read_sharded(tmp_path/'avg')[0], folders)
    r = under_limit(limit, "average_to_file(plan, out, out_format='safetensors')", tmp_path/'avg.safetensors', folders)
    assert r.returncode == 0, r.stderr
    check_against_shards(load_file(tmp_path/'avg.safetensors'), folders)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="RLIMIT_DATA counts private writable mappings on Linux only")
def test_torch_files_under_a_data_limit_below_one_model(tmp_path):
    states = [big_model(i) for i in range(3)]
    files = [tmp_path/f'ckpt{i}.pth' for i in range(3)]
    for s, f in zip(states, files): torch.save(s, f)
    limit = f'data:{files[0].stat().st_size//2}'
    r = under_limit(limit, IN_MEMORY, None, files)
    assert r.returncode == 1 and 'refused' in r.stderr, r.stderr
    r = under_limit(limit, "average_to_file(plan, out)", tmp_path/'avg.pth', files)
    assert r.returncode == 0, r.stderr
    assert same(torch.load(tmp_path/'avg.pth', weights_only=True), mean_of(states))


@pytest.fixture
def memory_cgroup():
    "A fresh cgroup v1 memory group under this process's own, removed after the test; skips where none can be made"
    lines = Path('/proc/self/cgroup').read_text().splitlines() if Path('/proc/self/cgroup').exists() else []
    line = next((l for l in lines if 'memory' in l.split(':')[1].split(',')), None)
    if line is None: pytest.skip("no cgroup v1 memory controller for this process (/proc/self/cgroup names none; v2 is not used here)")
    parent = Path('/sys/fs/cgroup/memory', line.split(':', 2)[2].lstrip('/'))
    group = parent/f'ckpt_avg_test_{os.getpid()}'
    try: group.mkdir()
    except OSError as e: pytest.skip(f"cannot create a memory cgroup in {parent}: {e.strerror} (needs root or a delegated cgroup)")
    try:
        (group/'memory.oom_control').write_text('0')  # a process over the limit is killed, never left waiting
        yield group
    finally: group.rmdir()


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="cgroups are Linux's")
def test_average_in_a_memory_cgroup_below_one_model(tmp_path, memory_cgroup, big_folders):
    # A cgroup counts file pages too but can reclaim them; anonymous memory it cannot (no swap), so a process that holds
    # more than the limit of its own is killed. The child joins the group after its imports and its plan, with its inputs
    # dropped from the page cache, so every byte it reads and writes passes through the limit of half a model.
    folders, model = big_folders
    (memory_cgroup/'memory.limit_in_bytes').write_text(str(model//2))
    r = under_limit(f'cgroup:{memory_cgroup}', IN_MEMORY, None, folders)  # killed by the cgroup's OOM killer
    assert r.returncode == -9, (r.returncode, r.stderr)
    (memory_cgroup/'memory.failcnt').write_text('0')
    r = under_limit(f'cgroup:{memory_cgroup}', SHARDED, tmp_path/'avg', folders)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert int((memory_cgroup/'memory.failcnt').read_text()) > 0  # the average met the limit: pages were reclaimed as it went
    check_against_shards(read_sharded(tmp_path/'avg')[0], folders)


@pytest.mark.skipif(importlib.util.find_spec('numba') is None, reason='numba is not installed')
def test_dcp_inputs_with_numba_kernel(tmp_path):
    # DCP checkpoints hold shapes only until a tensor is read: numba's readiness check must read through tensor(key)
    states = [model_state(i) for i in range(3)]
    for i, s in enumerate(states): dcp_save(s, tmp_path/f'dcp{i}')
    folders = [tmp_path/f'dcp{i}' for i in range(3)]
    plan = plan_average(folders, strip_prefix='model.', kernel='numba')
    assert plan.kernel == 'numba'
    assert same(average_checkpoints(plan), mean_of(states))
    average_to_file(folders, tmp_path/'avg', out_format='dcp', strip_prefix='model.', kernel='numba')
    assert same(dcp_read(tmp_path/'avg', states[0]), mean_of(states))


KILLED = """
import os, sys, torch
from ckpt_avg.sharded import write_sharded
spec = {k: (torch.float32, (100,)) for k in 'abcd'}
def items():
    for i, k in enumerate(spec):
        if i == 2: os._exit(9)  # killed mid-write: no cleanup runs
        yield k, torch.zeros(100)
write_sharded(spec, items(), sys.argv[1], max_shard_size=400)
"""


def test_killed_sharded_write_is_cleaned_by_the_next(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-c', KILLED, str(tmp_path/'avg')], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 9, r.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith('.avg.')]
    assert len(left) == 1 and left[0].is_dir() and not (tmp_path/'avg').exists()  # what a killed run leaves
    folders = [hf_folder(tmp_path/f'm{i}', model_state(i)) for i in range(2)]
    average_to_file(folders, tmp_path/'avg', out_format='sharded')
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
    assert same(read_sharded(tmp_path/'avg')[0], mean_of([model_state(0), model_state(1)]))
