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
