"""What the benchmarks share: `Runner`, which times a command as a child of a small process and reads its peak memory.

A child's `ru_maxrss` counts the memory of the process it was forked from (Linux records the old mm's peak at exec), so
children of a benchmark that has grown would all look as large as it is: the runner is started before that.
"""
import json, subprocess, sys

RUNNER = r'''
import json, os, subprocess, sys, tempfile, time
for line in sys.stdin:
    cmd, env = json.loads(line)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files, not pipes: wait4 must reap the child
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        text = [(f.seek(0), f.read().decode(errors='replace')[-2000:])[1] for f in (out, err)]
    print(json.dumps([wall, ru.ru_maxrss*1024, os.waitstatus_to_exitcode(status), *text]), flush=True)
'''


class Runner:
    "Runs commands from a small process started when this one is made; each call returns (wall s, ru_maxrss bytes, stdout)"
    def __init__(self):
        self.p = subprocess.Popen([sys.executable, '-c', RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    def __call__(self, cmd, env):
        self.p.stdin.write(json.dumps([cmd, env]) + '\n'); self.p.stdin.flush()
        wall, rss, rc, out, err = json.loads(self.p.stdout.readline())
        if rc: raise RuntimeError(f"{cmd[:3]} exited with {rc}: {err}")
        return wall, rss, out
