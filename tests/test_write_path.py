"The write path of every file: synced behind itself as it grows, and a replaced large file removed off the critical path"
import errno, os, threading, time
from pathlib import Path
import pytest
import ckpt_avg.files as files
from ckpt_avg.files import atomic_write, clean_stale_temps


def big(path, byte:int, mb:int=70):
    "A file of `mb` MiB of `byte` at `path`: above the size from which a replaced file is set aside"
    data = bytes([byte]) * (mb << 20)
    path.write_bytes(data)
    return data

def gone(path, timeout=10):
    end = time.monotonic() + timeout
    while path.exists() and time.monotonic() < end: time.sleep(0.02)
    return not path.exists()


def test_replacing_a_large_file_frees_nothing_on_the_way_and_removes_it_after(tmp_path, monkeypatch):
    out = tmp_path/'avg.pth'
    old = big(out, 1)
    inode = os.stat(out).st_ino
    aside = []
    monkeypatch.setattr(files, '_discard', aside.append)
    new = bytes([2]) * (70 << 20)
    atomic_write(out, lambda f: f.write(new))
    assert out.read_bytes() == new
    # the replaced file still had a second name when the new one took `out`: the rename freed nothing
    assert len(aside) == 1 and aside[0].parent == tmp_path and aside[0].name.startswith('.avg.pth.') and aside[0].name.endswith('.tmp')
    assert os.stat(aside[0]).st_ino == inode and aside[0].read_bytes() == old
    monkeypatch.undo()
    files._discard(aside[0])  # the real one: removed by another process, which this one does not wait for
    assert gone(aside[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['avg.pth']


def test_small_files_links_and_symlinks_are_replaced_as_before(tmp_path, monkeypatch):
    aside = []
    monkeypatch.setattr(files, '_discard', aside.append)
    small = tmp_path/'manifest.json'; small.write_bytes(b'{}')
    atomic_write(small, lambda f: f.write(b'[]'))
    linked, other = tmp_path/'a.pth', tmp_path/'b.pth'
    old = big(linked, 1); os.link(linked, other)
    atomic_write(linked, lambda f: f.write(b'new'))
    target, sym = tmp_path/'target.pth', tmp_path/'sym.pth'
    big(target, 3); sym.symlink_to(target)
    atomic_write(sym, lambda f: f.write(b'new'))
    assert aside == []  # nothing to free: small, or the old file keeps another name
    assert small.read_bytes() == b'[]' and linked.read_bytes() == b'new' and other.read_bytes() == old
    assert not sym.is_symlink() and sym.read_bytes() == b'new' and target.read_bytes()[:1] == bytes([3])


def test_a_failed_replace_keeps_the_old_file_and_leaves_no_second_name(tmp_path, monkeypatch):
    out = tmp_path/'avg.pth'
    old = big(out, 1)
    def refuse(src, dst): raise OSError(errno.EIO, 'I/O error')
    monkeypatch.setattr(os, 'replace', refuse)
    with pytest.raises(OSError, match='I/O error'): atomic_write(out, lambda f: f.write(b'new'))
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ['avg.pth']


def test_a_second_name_left_by_a_killed_writer_is_cleaned_and_never_the_only_copy(tmp_path):
    out = tmp_path/'avg.pth'
    old = big(out, 1)
    left = tmp_path/f'.avg.pth.{files._machine()}-999999999-00ff00ff.tmp'  # as _set_aside names it, in a process now gone
    os.link(out, left)
    assert clean_stale_temps(tmp_path) == [left]
    assert out.read_bytes() == old


def test_long_writes_sync_behind_themselves_and_the_last_fsync_after(tmp_path, monkeypatch):
    calls, out, real = [], tmp_path/'avg.bin', files._fdatasync
    def record(fd):
        calls.append((threading.current_thread().name, os.fstat(fd).st_size))
        real(fd)
    monkeypatch.setattr(files, '_fdatasync', record)
    fsyncs = []
    monkeypatch.setattr(os, 'fsync', lambda fd: fsyncs.append(os.fstat(fd).st_size))
    chunk = os.urandom(1 << 20)
    def write(f):
        for _ in range(100): f.write(chunk); time.sleep(0.002)
    meta = atomic_write(out, write)
    assert meta['bytes'] == 100 << 20 and out.stat().st_size == 100 << 20
    # synced on a thread while the writing went on, from 32 MiB; the file synced whole at the end, before its name
    assert calls and all(name == 'ckpt_avg-sync' and 32 << 20 <= size < 100 << 20 for name, size in calls)
    assert fsyncs[0] == 100 << 20


def test_a_failed_sync_behind_fails_the_write_and_leaves_nothing(tmp_path, monkeypatch):
    def broken(fd): raise OSError(errno.EIO, 'I/O error')
    monkeypatch.setattr(files, '_fdatasync', broken)
    (tmp_path/'a.bin').write_bytes(b'old')
    data = os.urandom(80 << 20)
    with pytest.raises(OSError, match='I/O error'):
        atomic_write(tmp_path/'a.bin', lambda f: f.write(data[:40 << 20]) and f.write(data[40 << 20:]))
    assert (tmp_path/'a.bin').read_bytes() == b'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.bin']
    assert not any(t.name == 'ckpt_avg-sync' for t in threading.enumerate())


def test_a_failed_write_waits_for_its_sync_before_closing_the_file(tmp_path, monkeypatch):
    synced, real = [], files._fdatasync
    def slow(fd): time.sleep(0.3); real(fd); synced.append(fd)  # EBADF here if the file were closed meanwhile
    monkeypatch.setattr(files, '_fdatasync', slow)
    def write(f):
        f.write(os.urandom(40 << 20))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match='No space'): atomic_write(tmp_path/'a.bin', write)
    assert len(synced) == 1 and list(tmp_path.iterdir()) == []


def test_a_failed_write_reports_its_own_error_before_that_of_its_sync(tmp_path, monkeypatch):
    def broken(fd): time.sleep(0.1); raise OSError(errno.EIO, 'I/O error')
    monkeypatch.setattr(files, '_fdatasync', broken)
    def write(f):
        f.write(os.urandom(40 << 20))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match='No space'): atomic_write(tmp_path/'a.bin', write)
    assert list(tmp_path.iterdir()) == []
