"""Average K sharded safetensors folders: ckpt_avg against a plain per-shard safetensors loop (and mergekit, if installed).

A llama-shaped layer stack at reduced width (bf16, several shards per checkpoint) is written to a temporary folder; each
method runs in a fresh process that reports its wall time and its peak resident memory past what it held after its
imports (the peak is reset there through /proc/self/clear_refs, so `import torch` is not counted). Files are in the
page cache for every method (each run reads what the previous read). Linux only.

    PYTHONPATH=. python bench/sharded_bench.py [--layers 6] [--width 1024] [--k 3] [--shard-mb 60]
"""
import argparse, json, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).parents[1]

PRELUDE = r"""
import re, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
status = lambda f: int(re.search(f + r':\s+(\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024
Path('/proc/self/clear_refs').write_text('5')
base, t0 = status('VmRSS'), time.perf_counter()
"""
CODA = "\nprint(time.perf_counter() - t0, status('VmHWM') - base)\n"

CKPT_AVG = """
from ckpt_avg.core import average_to_file
average_to_file(sys.argv[1:-1], sys.argv[-1], out_format='sharded', max_shard_size='{shard}', kernel='numpy')
"""

# what a user writes by hand: for each shard, load it from every folder, average in float64, save it; then copy the index
PLAIN = """
import json, shutil
ins, out = [Path(a) for a in sys.argv[1:-1]], Path(sys.argv[-1])
out.mkdir()
index = json.loads((ins[0]/'model.safetensors.index.json').read_text())
for name in sorted(set(index['weight_map'].values())):
    parts = [load_file(d/name) for d in ins]
    avg = {k: (sum(p[k].double() for p in parts) / len(parts)).to(parts[0][k].dtype) for k in parts[0]}
    save_file(avg, out/name, metadata={'format': 'pt'})
    del parts, avg
shutil.copy(ins[0]/'model.safetensors.index.json', out)
"""

MERGEKIT_YAML = "merge_method: linear\ndtype: bfloat16\nmodels:\n{models}"


def make_model(folder, seed, layers, width, shard_mb):
    "A llama-shaped stack (attention, MLP, norms) in bfloat16, written as shards with an index by ckpt_avg's writer"
    import torch
    from ckpt_avg.sharded import write_sharded
    g, inter, vocab = torch.Generator().manual_seed(seed), width * 11 // 4, 8 * width
    shapes = {'model.embed_tokens.weight': (vocab, width)}
    for i in range(layers):
        p = f'model.layers.{i}.'
        shapes.update({p+'self_attn.q_proj.weight': (width, width), p+'self_attn.k_proj.weight': (width, width),
                       p+'self_attn.v_proj.weight': (width, width), p+'self_attn.o_proj.weight': (width, width),
                       p+'mlp.gate_proj.weight': (inter, width), p+'mlp.up_proj.weight': (inter, width),
                       p+'mlp.down_proj.weight': (width, inter), p+'input_layernorm.weight': (width,),
                       p+'post_attention_layernorm.weight': (width,)})
    shapes.update({'model.norm.weight': (width,), 'lm_head.weight': (vocab, width)})
    spec = {k: (torch.bfloat16, s) for k, s in shapes.items()}
    items = ((k, torch.randn(s, generator=g).bfloat16()) for k, s in shapes.items())
    write_sharded(spec, items, folder, max_shard_size=shard_mb * 10**6)
    (folder/'config.json').write_text(json.dumps({'architectures': ['LlamaForCausalLM'], 'hidden_size': width}))
    return sum(2 * torch.Size(s).numel() for s in shapes.values())


def run(code, args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-c', PRELUDE + code + CODA, *map(str, args)], capture_output=True, text=True, env=env)
    if r.returncode: raise RuntimeError(r.stderr[-2000:])
    seconds, peak = r.stdout.split()[-2:]
    return float(seconds), int(peak)


def same_output(a, b):
    import torch
    from safetensors.torch import load_file
    names = sorted(set(json.loads((a/'model.safetensors.index.json').read_text())['weight_map'].values()))
    return all(torch.equal(x[k], y[k]) for n in names for x, y in [(load_file(a/n), load_file(b/n))] for k in x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--layers', type=int, default=6); ap.add_argument('--width', type=int, default=1024)
    ap.add_argument('--k', type=int, default=3); ap.add_argument('--shard-mb', type=int, default=60)
    ap.add_argument('--repeat', type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='sharded_bench_'))
    try:
        ins = [tmp/f'checkpoint-{i+1}' for i in range(a.k)]
        size = [make_model(d, i, a.layers, a.width, a.shard_mb) for i, d in enumerate(ins)][0]
        shards = len(list(ins[0].glob('*.safetensors')))
        print(f"model: {a.layers} layers, width {a.width}, bf16, {size/1e6:.0f} MB in {shards} shards; K={a.k}; {sys.platform}, {os.cpu_count()} cpus")
        methods = {'ckpt_avg average_to_file': CKPT_AVG.format(shard=f'{a.shard_mb}MB'), 'plain per-shard safetensors loop': PLAIN}
        rows = {}
        for r in range(a.repeat):
            for i, (name, code) in enumerate(methods.items()):
                out = tmp/f'out_{i}_{r}'
                rows.setdefault(name, []).append(run(code, ins + [out]))
                if r == a.repeat - 1: rows[name + ' out'] = out
                else: shutil.rmtree(out)
        exact = same_output(rows['ckpt_avg average_to_file out'], rows['plain per-shard safetensors loop out'])
        for name in methods:
            secs, peaks = zip(*rows[name])
            print(f"{name:34s} time {min(secs):6.2f} s (best of {a.repeat})   peak past imports {max(peaks)/1e6:7.0f} MB = {max(peaks)/size:.2f} x model")
        print(f"outputs bit-identical: {exact}")
        try:
            import mergekit  # noqa: F401
            print("mergekit is installed but not measured here: run `mergekit-yaml` with a linear merge on", ins)
        except ImportError: print("mergekit: not installed, not measured")
    finally: shutil.rmtree(tmp)


if __name__ == '__main__': main()
