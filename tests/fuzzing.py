"""Mutations of real checkpoint files for the differential fuzz test (tests/test_fuzz.py): blind byte edits, and edits that
know the zip, pickle and safetensors layouts, so that many mutants get past the outer checks to the interesting ones."""
import io, json, pickletools, random, struct, zipfile


def _zip_entries(b):
    "(name, central directory entry offset, local header offset, data start, size) of each record of a torch zip file"
    z = zipfile.ZipFile(io.BytesIO(b))
    out, cd = [], b.rfind(b'PK\x01\x02', 0, z.start_dir + 1)
    pos = z.start_dir
    for info in z.infolist():
        n, e = struct.unpack('<HH', b[info.header_offset+26:info.header_offset+30])
        out.append((info.filename, pos, info.header_offset, info.header_offset + 30 + n + e, info.file_size))
        pos += 46 + len(info.orig_filename.encode()) + len(info.extra) + len(info.comment)
    return out


def _pickle_ops(b):
    "(opcode name, argument, position of the argument, its width) of the data.pkl of a torch zip file"
    name, _, _, start, size = next(e for e in _zip_entries(b) if e[0].endswith('/data.pkl'))
    ops, data = [], b[start:start+size]
    for op, arg, pos in pickletools.genops(data):
        width = {'BININT1': 1, 'BININT2': 2, 'BININT': 4, 'BINGET': 1, 'BINPUT': 1, 'LONG_BINGET': 4, 'LONG_BINPUT': 4}.get(op.name)
        if op.name == 'BINUNICODE': width = len(arg.encode())
        if width: ops.append((op.name, arg, start + pos + 1 + (4 if op.name == 'BINUNICODE' else 0), width))
    return ops


def _put(b, at, width, value):
    fmt = {1: '<B', 2: '<H', 4: '<I', 8: '<Q'}[width]
    b[at:at+width] = struct.pack(fmt, value % (1 << 8*width))


def _number(rng, old):
    return rng.choice([0, 1, 2, old - 1, old + 1, old * 2, old + 64, 255, 65535, 2**31 - 1, 2**32 - 1, rng.randrange(1 << 16)])


def blind(rng, b):
    "Edits that know nothing of the format"
    b = bytearray(b)
    i, kind = rng.randrange(len(b)), rng.choice(['flip', 'zero', 'ff', 'random', 'truncate', 'insert', 'delete', 'duplicate'])
    if kind == 'flip': b[i] ^= 1 << rng.randrange(8)
    elif kind in ('zero', 'ff', 'random'):
        n = rng.choice([1, 1, 2, 4, 8])
        b[i:i+n] = bytes([{'zero': 0, 'ff': 255}.get(kind, rng.randrange(256)) for _ in range(n)])[:len(b)-i]
    elif kind == 'truncate': del b[i:]
    elif kind == 'insert': b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 8, 64])))
    elif kind == 'delete': del b[i:i+rng.choice([1, 2, 8, 64])]
    else:
        j, n = rng.randrange(len(b)), rng.choice([4, 16, 64, 512])
        b[i:i+n] = b[j:j+n]
    return bytes(b), kind


def pickle_edit(rng, b):
    "Change one number or string of the pickle in place: a shape, a stride, an offset, a storage size or key, a memo index"
    b, ops = bytearray(b), _pickle_ops(b)
    name, arg, at, width = rng.choice(ops)
    if name == 'BINUNICODE':
        if not width: return bytes(b), 'pickle-empty-string'
        j = at + rng.randrange(width)
        b[j] = rng.choice(b'0123456789abcdefz/._') if rng.random() < .8 else rng.randrange(256)
        return bytes(b), 'pickle-string'
    _put(b, at, width, _number(rng, arg))
    return bytes(b), f'pickle-{name}'


def zip_edit(rng, b):
    "Change a size or offset in the zip's directory, local headers or end records"
    b, entries = bytearray(b), _zip_entries(b)
    name, cd, local, start, size = rng.choice(entries)
    field = rng.choice(['cd-size', 'cd-usize', 'cd-offset', 'local-size', 'local-namelen', 'local-extralen', 'eocd-count', 'eocd-cdoffset', 'eocd64-cdoffset'])
    at, width = {'cd-size': (cd+20, 4), 'cd-usize': (cd+24, 4), 'cd-offset': (cd+42, 4), 'local-size': (local+18, 4),
                 'local-namelen': (local+26, 2), 'local-extralen': (local+28, 2), 'eocd-count': (len(b)-12, 2),
                 'eocd-cdoffset': (len(b)-6, 4), 'eocd64-cdoffset': (len(b)-22-20-56+48, 8)}[field]
    old = int.from_bytes(b[at:at+width], 'little')
    if field == 'cd-offset': new = rng.choice([e[2] for e in entries] + [old + 1, old - 1, 0])  # point into another record
    elif field in ('cd-size', 'cd-usize'): new = rng.choice([0, size - 1, size + 1, size + 64, size * 2, 0xFFFFFFFF])
    else: new = _number(rng, old)
    _put(b, at, width, new)
    if field == 'cd-size' and rng.random() < .5: _put(b, cd+24, 4, new)  # both sizes: stays "stored"
    return bytes(b), f'zip-{field}'


def safetensors_edit(rng, b):
    "Change the JSON header: an offset, a shape, a dtype, a name; re-padded to its length, or with the length prefix rewritten"
    n = struct.unpack('<Q', b[:8])[0]
    header = json.loads(b[8:8+n])
    keys = [k for k in header if k != '__metadata__']
    k = rng.choice(keys)
    v, kind = header[k], rng.choice(['offset', 'offsets', 'shape', 'dtype', 'zero', 'negative', 'swap', 'drop', 'metadata'])
    if kind == 'offset': v['data_offsets'][rng.randrange(2)] += rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 1 << 20])
    elif kind == 'offsets': v['data_offsets'] = sorted(rng.randrange(len(b)) for _ in range(2))
    elif kind == 'shape':
        if v['shape'] and rng.random() < .7: v['shape'][rng.randrange(len(v['shape']))] = rng.choice([0, 1, 2, 3, 1 << 40])
        else: v['shape'] = v['shape'] + [rng.choice([0, 1, 2])]
    elif kind == 'dtype': v['dtype'] = rng.choice(['F32', 'F16', 'BF16', 'I64', 'I8', 'U8', 'BOOL', 'F64', 'F8_E4M3', 'X'])
    elif kind == 'zero': v['data_offsets'] = [0, 0]
    elif kind == 'negative': v['data_offsets'] = [-(rng.randrange(1, n + 8)), v['data_offsets'][1]]
    elif kind == 'swap':
        other = header[rng.choice(keys)]
        v['data_offsets'], other['data_offsets'] = other['data_offsets'], v['data_offsets']
    elif kind == 'drop': del header[k]
    else: header['__metadata__'] = rng.choice([{'a': 1}, [], 'x', None, {'a': 'b'}])
    text = json.dumps(header).encode()
    if len(text) <= n and rng.random() < .7: text = text + b' ' * (n - len(text))
    return struct.pack('<Q', len(text)) + text + b[8+n:], f'safetensors-{kind}'


def mutate(rng, b, kind):
    "One mutant of the file content `b`, a torch zip ('zip'), a legacy torch file ('legacy') or a safetensors file"
    r = rng.random()
    try:
        if kind == 'zip' and r < .35: return pickle_edit(rng, b)
        if kind == 'zip' and r < .55: return zip_edit(rng, b)
        if kind == 'safetensors' and r < .5: return safetensors_edit(rng, b)
    except (ValueError, KeyError, IndexError, struct.error, zipfile.BadZipFile): pass
    return blind(rng, b)
