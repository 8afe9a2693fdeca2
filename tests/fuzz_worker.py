"""Reads each path sent on stdin with our reader and with the reference reader, and says how they compare (tests/test_fuzz.py).

One JSON line per phase: {"ours": ...} as soon as our reader is done (so a crash of the reference still tells what we did),
then {"outcome": ...}. Run in a subprocess under an address-space limit: a reference that crashes or blows memory on a
damaged file only kills this worker, which the test restarts.
"""
import json, os, resource, sys, warnings
warnings.simplefilter('ignore')
import torch
from fastcore.foundation import L
from safetensors.torch import load_file
from ckpt_avg.formats import CheckpointError, read_checkpoint, _KEY

torch.set_num_threads(1)


def limit_memory(extra_gb):
    "Cap the address space at what the imports took plus `extra_gb`: a reader asking for more gets MemoryError, not the machine's memory"
    vm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(extra_gb * 2**30),) * 2)


def reference(path, kind):
    "What the reference reader returns for `path`: the safetensors package, or torch.load(weights_only=True)"
    if kind == 'safetensors': return load_file(path)
    with torch.serialization.safe_globals([L]): return torch.load(path, map_location='cpu', weights_only=True)


def same(a, b):
    "Equal as checkpoints: dtype, shape, strides (of non-empty tensors) and every bit of the values"
    if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape: return False
    if a.numel() and a.stride() != b.stride(): return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def ours(path):
    "('accept', checkpoint) / ('refuse', message) / ('error', type: message) of our reader"
    try: return 'accept', read_checkpoint(path)
    except CheckpointError as e:
        if 'MemoryError' in str(e): return 'memory', str(e)[:300]  # a reader that tried to take memory out of proportion
        return 'refuse', str(e)
    except BaseException as e: return 'error', f'{type(e).__name__}: {str(e)[:300]}'


def compare(path, kind):
    status, ck = ours(path)
    print(json.dumps({'ours': status, 'detail': ck if isinstance(ck, str) else ''}), flush=True)
    try: ref = reference(path, kind)
    except BaseException as e: ref, why = None, f'{type(e).__name__}: {str(e)[:200]}'
    if status != 'accept': return ('both_refuse' if ref is None else 'ours_stricter') if status == 'refuse' else f'FAIL_{status}', ''
    if ref is None: return 'FAIL_laxer', why
    if ck.format != 'safetensors' and ck.format != 'state_dict':
        ref = ref.get(_KEY[ck.format]) if isinstance(ref, dict) else None
    if not isinstance(ref, dict) or set(ref) != set(ck.state): return 'FAIL_differ', 'keys'
    bad = [k for k in ck.state if not same(ck.state[k], ref[k])]
    return ('FAIL_differ', f'tensors {bad[:3]}') if bad else ('equal', '')


if __name__ == '__main__':
    limit_memory(float(os.environ.get('FUZZ_WORKER_GB', '3')))
    print(json.dumps({'ready': True}), flush=True)
    for line in sys.stdin:
        path, kind = json.loads(line)
        outcome, detail = compare(path, kind)
        print(json.dumps({'outcome': outcome, 'detail': detail}), flush=True)
