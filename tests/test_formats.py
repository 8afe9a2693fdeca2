"Every checkpoint format in and out: detection from content, overriding it, round trips, and the files each tool writes"
from pathlib import Path
import pytest, torch
from fastai.learner import save_model, load_model
from fastai.optimizer import Adam
from ckpt_avg.core import average_checkpoints
from ckpt_avg.formats import FORMATS, read_checkpoint, write_checkpoint, CheckpointError

safetensors_torch = pytest.importorskip('safetensors.torch')


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))


def opt_state(model):
    opt = Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 4)).sum().backward(); opt.step()
    return opt


def as_tool_writes(fmt, sd, file, model=None):
    "Write `sd` the way the tool behind `fmt` writes its checkpoints"
    opt = {'state': [{'exp_avg': torch.zeros(2)}], 'param_groups': [{'lr': 0.1}]}
    if fmt == 'fastai':
        m = small_model(); m.load_state_dict(sd)
        save_model(file, m, opt_state(m), with_opt=True)
        return {k: v for k, v in torch.load(file, weights_only=False)['model'].items()}
    if fmt == 'state_dict': torch.save(sd, file)
    elif fmt == 'lightning':
        torch.save({'epoch': 2, 'global_step': 20, 'pytorch-lightning_version': '2.5.0', 'state_dict': {'model.'+k: v for k, v in sd.items()},
                    'loops': {}, 'callbacks': {}, 'optimizer_states': [opt], 'lr_schedulers': [], 'hparams_name': 'kwargs',
                    'hyper_parameters': {'lr': 0.1}}, file)
    elif fmt in ('timm', 'timm_ema'):
        torch.save({'epoch': 2, 'arch': 'resnet', 'state_dict': sd, 'state_dict_ema': {k: v.clone()+1 if v.is_floating_point() else v for k, v in sd.items()},
                    'optimizer': opt, 'version': 2, 'args': None}, file)
    elif fmt == 'fairseq':
        torch.save({'args': None, 'cfg': {'model': {'arch': 'x'}}, 'model': sd, 'optimizer_history': [{'num_updates': 3}],
                    'extra_state': {'epoch': 2}, 'last_optimizer_state': opt}, file)
    elif fmt == 'safetensors': safetensors_torch.save_file(sd, file)
    return sd


@pytest.mark.parametrize('fmt', FORMATS)
def test_each_tools_file_is_detected_and_read_through_our_reader(tmp_path, fmt):
    sd = small_model().state_dict()
    f = tmp_path/f'x.{fmt}'
    sd = as_tool_writes(fmt, sd, f)
    ck = read_checkpoint(f, format='timm_ema' if fmt == 'timm_ema' else None, strip_prefix='model.' if fmt == 'lightning' else None)
    assert ck.format == fmt
    assert ck.has_opt == (fmt not in ('state_dict', 'safetensors'))
    assert ck.mapping is not None  # our mapped reader, not torch.load: optimizer bytes never touched, pages releasable
    want = {k: (v+1 if v.is_floating_point() else v) for k, v in sd.items()} if fmt == 'timm_ema' else sd
    assert sorted(ck.state) == sorted(want) and all(torch.equal(ck.state[k], want[k]) for k in want)


@pytest.mark.parametrize('src', FORMATS)
@pytest.mark.parametrize('dst', FORMATS)
def test_average_read_in_every_format_and_written_in_every_format(tmp_path, src, dst):
    states = []
    for i in range(3):
        m = small_model()
        with torch.no_grad():
            for p in m.parameters(): p.add_(i)
            m[1].num_batches_tracked.fill_(i)
        states.append(as_tool_writes(src, {k: v.clone() for k, v in m.state_dict().items()}, tmp_path/f'{i}.{src}'))
    files = [tmp_path/f'{i}.{src}' for i in range(3)]
    avg = average_checkpoints(files, format='timm_ema' if src == 'timm_ema' else None, strip_prefix='model.' if src == 'lightning' else None)
    if src == 'timm_ema': states = [{k: (v+1 if v.is_floating_point() else v) for k, v in s.items()} for s in states]
    ref = {k: (sum(s[k].double() for s in states)/3).float() if v.is_floating_point() else states[-1][k] for k, v in states[0].items()}
    write_checkpoint(avg, tmp_path/'avg', dst)
    back = read_checkpoint(tmp_path/'avg').state
    assert sorted(back) == sorted(ref) and all(torch.equal(back[k], ref[k]) and back[k].dtype == ref[k].dtype for k in ref)
    # and the tool's own loader reads it
    if dst == 'safetensors': theirs = safetensors_torch.load_file(tmp_path/'avg')
    else:
        obj = torch.load(tmp_path/'avg', weights_only=True)
        theirs = obj[{'lightning': 'state_dict', 'timm': 'state_dict', 'timm_ema': 'state_dict', 'fairseq': 'model'}[dst]] if dst in ('lightning', 'timm', 'timm_ema', 'fairseq') else obj
    small_model().load_state_dict(theirs)


def test_fastai_loads_our_fastai_output_into_a_model(tmp_path):
    m = small_model()
    opt = opt_state(m)
    save_model(tmp_path/'a.pth', m, opt, with_opt=True)
    write_checkpoint(average_checkpoints([tmp_path/'a.pth']*2), tmp_path/'avg.pth', 'fastai')
    fresh = small_model()
    with torch.no_grad():
        for p in fresh.parameters(): p.zero_()
    load_model(tmp_path/'avg.pth', fresh, None, with_opt=False)
    assert all(torch.equal(fresh.state_dict()[k], m.state_dict()[k]) for k in m.state_dict())


def test_forced_format_and_its_errors(tmp_path):
    sd = small_model().state_dict()
    as_tool_writes('fairseq', sd, tmp_path/'f.pt')
    assert read_checkpoint(tmp_path/'f.pt', format='fastai').format == 'fastai'  # both keep weights under 'model'
    with pytest.raises(CheckpointError, match=r"not a timm checkpoint \(no weights under 'state_dict'\); it looks like fairseq"):
        read_checkpoint(tmp_path/'f.pt', format='timm')
    with pytest.raises(ValueError, match='pass one of fastai'): read_checkpoint(tmp_path/'f.pt', format='keras')
    safetensors_torch.save_file(sd, tmp_path/'s.safetensors')
    with pytest.raises(CheckpointError, match='not a fairseq checkpoint'): read_checkpoint(tmp_path/'s.safetensors', format='fairseq')


def test_legacy_and_unusual_torch_files_go_through_torch_load(tmp_path):
    sd = {'w': torch.randn(3).half(), 'n': torch.tensor(2)}
    torch.save(sd, tmp_path/'old.pth', _use_new_zipfile_serialization=False)
    ck = read_checkpoint(tmp_path/'old.pth')
    assert ck.mapping is None and torch.equal(ck.state['w'], sd['w'])  # read, but never released: not our mapping
    ck.release(ck.state['w'])
    assert torch.equal(ck.state['w'], sd['w'])


def test_release_keeps_data_readable(tmp_path):
    "madvise(DONTNEED) on our private file mapping drops pages, never data: reading again gives the same values"
    sd = {'w': torch.randn(1 << 20)}
    torch.save(sd, tmp_path/'w.pth')
    ck = read_checkpoint(tmp_path/'w.pth')
    assert ck.mapping is not None
    total = ck.state['w'].sum()
    ck.release(ck.state['w'])
    assert torch.equal(ck.state['w'], sd['w']) and ck.state['w'].sum() == total


def test_safetensors_keeps_dtypes_and_metadata(tmp_path):
    sd = {'h': torch.randn(3).half(), 'b': torch.randn(3).bfloat16(), 'd': torch.randn(2).double(), 'i': torch.arange(3, dtype=torch.int32),
          'flag': torch.tensor([True, False]), 'empty': torch.zeros(0), 'scalar': torch.tensor(1.5)}
    write_checkpoint(sd, tmp_path/'x.safetensors', 'safetensors', meta={'averaged': 3})
    ck = read_checkpoint(tmp_path/'x.safetensors')
    assert ck.meta == {'averaged': '3'}
    theirs = safetensors_torch.load_file(tmp_path/'x.safetensors')
    for k, v in sd.items():
        assert torch.equal(ck.state[k], v) and ck.state[k].dtype == v.dtype and ck.state[k].shape == v.shape, k
        assert torch.equal(theirs[k], v), k


# Readers never laxer than the reference readers: the crafted files of issue 13, each refused with a CheckpointError
import collections, io, json, os, struct, subprocess, sys, zipfile
from ckpt_avg.formats import _Pickler, _Record

ROOT = Path(__file__).parents[1]


class Tensor:
    "Pickles as a tensor over storage record `key` of `numel` elements, with any offset, shape and strides"
    def __init__(self, key, numel, shape, stride, offset=0, dtype=torch.float32): self.args = key, numel, shape, stride, offset, dtype
    def __reduce_ex__(self, protocol):
        key, numel, shape, stride, offset, dtype = self.args
        return (torch._utils._rebuild_tensor_v2, (_Record(key, dtype, numel), offset, shape, stride, False, collections.OrderedDict()))


def torch_zip(path, obj=None, records=(), pkl=None):
    "A zip file written by torch's own writer, holding the pickle of `obj` (or the bytes `pkl`) and storage `records`"
    if pkl is None:
        buf = io.BytesIO(); _Pickler(buf, protocol=2).dump(obj); pkl = buf.getvalue()
    with torch.serialization._open_zipfile_writer(str(path)) as z:
        z.write_record('data.pkl', pkl, len(pkl))
        z.write_record('byteorder', b'little', 6)
        for key, data in dict(records).items(): z.write_record(f'data/{key}', data, len(data))
    return path


def safetensors_file(path, header, data=b''):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(h)) + h + data)
    return path


def refused(path, match):
    with pytest.raises(CheckpointError, match=match) as e: read_checkpoint(path)
    assert str(path) in str(e.value)  # the message names the file


def test_a_zero_byte_record_under_a_shape_is_refused_not_filled_with_memory(tmp_path):
    f = torch_zip(tmp_path/'z.pth', {'w': Tensor('0', 0, (4, 4), (4, 1))}, {'0': b''})
    with pytest.raises(RuntimeError): torch.load(f, weights_only=True)  # torch refuses it too
    refused(f, 'needs more bytes than its storage record holds')
    f = torch_zip(tmp_path/'short.pth', {'w': Tensor('0', 16, (4, 4), (4, 1))}, {'0': b''})  # the pickle promises 16 floats
    refused(f, "storage '0' needs a record of 64 bytes")


def test_safetensors_offsets_must_tile_the_data(tmp_path):
    w = dict(dtype='F32', shape=[4])
    cases = {'zero': ({'w': w | dict(data_offsets=[0, 0])}, b'', 'needs 16 bytes, not 0'),
             'negative': ({'w': w | dict(data_offsets=[-16, 0])}, b'', 'not two ints >= 0'),
             'overlap': ({'a': w | dict(data_offsets=[0, 16]), 'b': w | dict(data_offsets=[8, 24])}, bytes(24), 'must tile the data'),
             'gap': ({'a': w | dict(data_offsets=[0, 16]), 'b': w | dict(data_offsets=[20, 36])}, bytes(36), 'must tile the data'),
             'short': ({'a': w | dict(data_offsets=[0, 16])}, bytes(8), 'cover 16 bytes of its 8')}
    for name, (header, data, msg) in cases.items():
        f = safetensors_file(tmp_path/f'{name}.safetensors', header, data)
        with pytest.raises(Exception): safetensors_torch.load_file(f)  # the package refuses each
        refused(f, msg)


def test_a_zip_directory_entry_pointing_into_another_record_is_refused(tmp_path):
    f = tmp_path/'two.pth'
    torch.save({'a': torch.ones(64), 'b': torch.zeros(64)}, f)
    b = bytearray(f.read_bytes())
    z = zipfile.ZipFile(f)
    a, bb = z.getinfo('two/data/0'), z.getinfo('two/data/1')
    entry = b.index(b'PK\x01\x02' + b[z.start_dir+4:z.start_dir+28], z.start_dir)  # walk to b's central directory entry
    while b[entry+46:entry+46+len('two/data/1')] != b'two/data/1': entry = b.index(b'PK\x01\x02', entry + 4)
    b[entry+42:entry+46] = struct.pack('<I', a.header_offset)  # b's entry now points at a's local header
    f.write_bytes(bytes(b))
    refused(f, "has no matching local header")


def test_a_stride_0_tensor_of_a_tiny_file_is_refused_on_both_paths(tmp_path):
    expanded = Tensor('0', 1, (1 << 20, 1 << 10), (0, 0))  # 2**30 floats over 4 bytes
    f = torch_zip(tmp_path/'x.pth', {'w': expanded}, {'0': bytes(4)})
    assert f.stat().st_size < 2000
    refused(f, 'elements that overlap')
    # torch.Size is read by torch.load only: the same tensor through the torch.load path is refused too
    f = torch_zip(tmp_path/'y.pth', {'model': {'w': expanded}, 'opt': {'size': torch.Size([3])}}, {'0': bytes(4)})
    refused(f, 'elements that overlap')
    f = torch_zip(tmp_path/'o.pth', {'w': Tensor('0', 4, (3, 2), (1, 1))}, {'0': bytes(16)})  # overlapping rows
    refused(f, 'elements that overlap')


def test_two_data_pkl_roots_are_refused(tmp_path):
    f = tmp_path/'r.pth'
    torch.save({'w': torch.ones(2)}, f)
    f.write_bytes(f.read_bytes().replace(b'r/byteorder', b'rx/data.pkl'))  # same length: a second root
    assert sorted(n for n in zipfile.ZipFile(f).namelist() if n.endswith('data.pkl')) == ['r/data.pkl', 'rx/data.pkl']
    refused(f, "holds 2 '\\*/data.pkl' records")


def run_isolated(code, tmp_path):
    "Run `code` in a fresh interpreter: a segfault kills that one, not the test run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_a_deeply_nested_pickle_is_refused_without_crashing(tmp_path):
    f = torch_zip(tmp_path/'deep.pth', pkl=b'\x80\x02})' + b'\x85' * 1_000_000 + b'K\x01s.')  # {1 MB tuple nested 1,000,000 deep: 1}
    r = run_isolated(f"from ckpt_avg.formats import read_checkpoint, CheckpointError\ntry: read_checkpoint({str(f)!r})\n"
                     "except CheckpointError as e: print('refused:', e)", tmp_path)
    assert r.returncode == 0, f"the reader crashed (exit code {r.returncode}): {r.stderr[-500:]}"
    assert 'refused:' in r.stdout and 'nests objects more than 100 deep' in r.stdout, r.stdout + r.stderr


def test_a_huge_memo_index_takes_no_memory(tmp_path):
    pkl = b'\x80\x02}r\x01\x00\x00\x04.'  # an empty dict stored at memo index 2**26+1: CPython's unpickler sizes its memo by the index
    f = torch_zip(tmp_path/'memo.pth', pkl=pkl)
    assert f.stat().st_size < 2000
    r = run_isolated(f"import resource\nfrom ckpt_avg.formats import read_checkpoint, CheckpointError\n"
                     "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                     f"try: read_checkpoint({str(f)!r})\nexcept CheckpointError as e: print('refused:', e)\n"
                     "print('grew KiB:', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)", tmp_path)
    grew = int(r.stdout.split('grew KiB:')[1])
    assert grew < 100_000, f"reading a {f.stat().st_size}-byte file took {grew/1e6:.1f} GB"
    assert 'memo entry out of order' in r.stdout, r.stdout + r.stderr


def test_build_cannot_change_the_functions_the_reader_allows(tmp_path):
    import ckpt_avg.torch_reader as formats  # the reader moved from formats to torch_reader
    def u(s): return b'X' + struct.pack('<I', len(s)) + s.encode()
    evil = (b'\x80\x02}' + u('w') +                           # {'w': ...
            b'ctorch._utils\n_rebuild_tensor_v2\n' +          # the function the reader calls for each tensor
            b'}' + u('__kwdefaults__') + b'}' + u('metadata') + b'\x88ssb'  # BUILD: rewrite its defaults
            b's.')
    f = torch_zip(tmp_path/'build.pth', pkl=evil)
    before = formats._rebuild_tensor.__kwdefaults__
    refused(f, "BUILD")
    assert formats._rebuild_tensor.__kwdefaults__ == before


def test_damaged_files_end_in_one_checkpoint_error_never_a_raw_traceback(tmp_path):
    cases = {  # each of these raised a RuntimeError, TypeError, KeyError or struct.error from the old reader
        'shape past record': torch_zip(tmp_path/'a.pth', {'w': Tensor('0', 4, (8,), (1,))}, {'0': bytes(16)}),
        'shape not a tuple': torch_zip(tmp_path/'b.pth', {'w': Tensor('0', 4, 'abcd', (1,))}, {'0': bytes(16)}),
        'negative stride': torch_zip(tmp_path/'c.pth', {'w': Tensor('0', 4, (4,), (-1,))}, {'0': bytes(16)}),
        'missing record': torch_zip(tmp_path/'d.pth', {'w': Tensor('7', 4, (4,), (1,))}, {'0': bytes(16)}),
        'bad dtype name': safetensors_file(tmp_path/'e.safetensors', {'w': {'dtype': 'F32', 'shape': 4, 'data_offsets': [0, 16]}}, bytes(16)),
        'offsets not a list': safetensors_file(tmp_path/'f.safetensors', {'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': 16}}, bytes(16)),
        'header past end': tmp_path/'g.safetensors',
        'truncated pickle': torch_zip(tmp_path/'h.pth', pkl=b'\x80\x02}X\xff\xff'),
    }
    (tmp_path/'g.safetensors').write_bytes(struct.pack('<Q', 64) + b'{"w":')
    for name, f in cases.items():
        with pytest.raises(CheckpointError, match=str(f.name)): read_checkpoint(f)
