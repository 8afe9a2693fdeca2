"""Average K sharded safetensors folders: ckpt_avg against a plain per-shard safetensors loop and mergekit's linear merge.

A llama-shaped layer stack at reduced width (bf16, several shards per checkpoint, a LlamaConfig config.json) is written
to a temporary folder; each method runs in a fresh process, `--repeat` rounds taken in turn, medians reported. Two
measures:

- past imports: each child reports its wall time and its peak resident memory past what it held after its imports (the
  peak is reset there through /proc/self/clear_refs). For mergekit this is a second run: its interpreter (the one
  `mergekit-yaml` names on its first line) imports `mergekit.scripts.run_yaml`, resets the peak, then calls its `main`
  with the same arguments, which is what `mergekit-yaml` runs;
- whole process: wall time from start to exit and `ru_maxrss` from `wait4` (the `mergekit-yaml` command itself for
  mergekit), taken by a small runner process started before this one grew (a child's `ru_maxrss` counts the process it
  was forked from); next to each, the same of its imports alone (`python -c "import ..."`, `mergekit-yaml --help`).
  "Whole minus imports" reads low for memory: an import's own transient peak hides whatever stays under it.

Files are in the page cache for every method (each run reads what the previous read). Linux only.

    PYTHONPATH=. python bench/sharded_bench.py [--layers 6] [--width 1024] [--k 3] [--shard-mb 60] [--mergekit PATH]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile
from runner import Runner
from pathlib import Path

ROOT = Path(__file__).parents[1]

IMPORTS = "import re, sys, time\nfrom pathlib import Path\nimport torch\nfrom safetensors.torch import load_file, save_file\n"
PRELUDE = IMPORTS + r"""
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

# mergekit's README: `mergekit-yaml config.yml out [--cuda] [--lazy-unpickle] [--allow-crimes]`; CPU here, no tokenizer
MERGEKIT_YAML = "merge_method: linear\ndtype: bfloat16\nmodels:\n{models}"
MERGEKIT_MODEL = "  - model: {path}\n    parameters:\n      weight: 1.0\n"
MERGEKIT_OPTIONS = ['--no-cuda', '--lazy-unpickle', '--no-copy-tokenizer', '--quiet']
MERGEKIT_PAST = """
import re, sys, time
from pathlib import Path
from mergekit.scripts.run_yaml import main
status = lambda f: int(re.search(f + r':\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1)) * 1024
Path('/proc/self/clear_refs').write_text('5')
base, t0 = status('VmRSS'), time.perf_counter()
main(args=sys.argv[1:], standalone_mode=False)
""" + CODA


def llama_config(layers, width, inter, vocab):
    "A LlamaConfig's config.json for these shapes (mergekit reads the architecture and layer count from it)"
    return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_size': width, 'intermediate_size': inter,
            'num_hidden_layers': layers, 'num_attention_heads': width // 64, 'num_key_value_heads': width // 64,
            'vocab_size': vocab, 'max_position_embeddings': 2048, 'rms_norm_eps': 1e-5, 'hidden_act': 'silu',
            'tie_word_embeddings': False, 'torch_dtype': 'bfloat16'}


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
    if not (folder/'config.json').exists(): (folder/'config.json').write_text(json.dumps(llama_config(layers, width, inter, vocab), indent=2))
    return sum(2 * torch.Size(s).numel() for s in shapes.values())


def read_output(folder):
    "name -> tensor of a sharded safetensors folder, through its index"
    from safetensors.torch import load_file
    wm = json.loads((folder/'model.safetensors.index.json').read_text())['weight_map']
    shards = {n: load_file(folder/n) for n in set(wm.values())}
    return {k: shards[n][k] for k, n in wm.items()}


def compare(a, b):
    "(same keys and dtypes, bit-identical, max |a-b|, share of elements that differ) of two sharded outputs"
    x, y = read_output(a), read_output(b)
    if x.keys() != y.keys() or any(x[k].dtype != y[k].dtype for k in x): return False, False, float('nan'), float('nan')
    diff = [(x[k].float() - y[k].float()).abs() for k in x]
    n = sum(d.numel() for d in diff)
    return True, all(not d.any() for d in diff), max(d.max().item() for d in diff), sum((d > 0).sum().item() for d in diff) / n


def median(xs): return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--layers', type=int, default=6); ap.add_argument('--width', type=int, default=1024)
    ap.add_argument('--k', type=int, default=3); ap.add_argument('--shard-mb', type=int, default=60)
    ap.add_argument('--repeat', type=int, default=3, help='rounds; medians are reported')
    ap.add_argument('--mergekit', default=shutil.which('mergekit-yaml'), help="mergekit's mergekit-yaml (default: the one on PATH)")
    a = ap.parse_args()
    runner = Runner()  # before this process imports torch
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    tmp = Path(tempfile.mkdtemp(prefix='sharded_bench_'))
    try:
        ins = [tmp/f'checkpoint-{i+1}' for i in range(a.k)]
        size = [make_model(d, i, a.layers, a.width, a.shard_mb) for i, d in enumerate(ins)][0]
        shards = len(list(ins[0].glob('*.safetensors')))
        print(f"model: {a.layers} layers, width {a.width}, bf16, {size/1e6:.0f} MB in {shards} shards; K={a.k}; {sys.platform}, {os.cpu_count()} cpus; medians of {a.repeat} rounds")
        py = lambda code, out: ([sys.executable, '-c', PRELUDE + code + CODA, *map(str, ins), str(out)], env)
        # name: (the whole run, which prints its past-imports figures unless a third run does, its imports alone)
        methods = {'ckpt_avg average_to_file': (lambda out: py(CKPT_AVG.format(shard=f'{a.shard_mb}MB'), out),
                                                ([sys.executable, '-c', IMPORTS + 'import ckpt_avg.core'], env)),
                   'plain per-shard safetensors loop': (lambda out: py(PLAIN, out), ([sys.executable, '-c', IMPORTS], env))}
        if a.mergekit and Path(a.mergekit).exists():
            (tmp/'merge.yml').write_text(MERGEKIT_YAML.format(models=''.join(MERGEKIT_MODEL.format(path=d) for d in ins)))
            mk_env = {k: v for k, v in env.items() if k != 'PYTHONPATH'}
            opts = MERGEKIT_OPTIONS + ['--out-shard-size', f'{a.shard_mb * 10**6 // 2}']  # parameters, bf16
            mk_python = Path(a.mergekit).read_text(errors='replace').splitlines()[0].removeprefix('#!').strip()
            mk_args = lambda out: [str(tmp/'merge.yml'), str(out), *opts]
            methods['mergekit-yaml linear'] = (lambda out: ([a.mergekit, *mk_args(out)], mk_env), ([a.mergekit, '--help'], mk_env),
                                               lambda out: ([mk_python, '-c', MERGEKIT_PAST, *mk_args(out)], mk_env))
        else: print(f"mergekit: {a.mergekit or 'mergekit-yaml'} not found (pass --mergekit PATH), not measured")
        rows, outs = {}, {}
        for r in range(a.repeat):
            for i, (name, (cmd, floor, *past)) in enumerate(methods.items()):
                out = tmp/f'out_{i}_{r}'
                wall, rss, stdout = runner(*cmd(out))
                fwall, frss, _ = runner(*floor)
                if past:
                    shutil.rmtree(out)
                    stdout = runner(*past[0](out))[2]
                rows.setdefault(name, []).append((*map(float, stdout.split()[-2:]), wall, rss, fwall, frss))
                if r == a.repeat - 1: outs[name] = out
                else: shutil.rmtree(out)
        print(f"{'':34s} {'past imports':>24s} | {'whole process (ru_maxrss)':>26s} | {'imports only':>22s} | {'whole - imports':>22s}")
        for name, rs in rows.items():
            secs, peak, wall, rss, fwall, frss = map(median, zip(*rs))
            print(f"{name:34s} {secs:6.2f} s {peak/1e6:6.0f} MB {peak/size:4.2f}x | {wall:6.2f} s {rss/1e6:6.0f} MB {' ':9s} | {fwall:6.2f} s {frss/1e6:6.0f} MB {' ':3s}"
                  f" | {wall-fwall:6.2f} s {(rss-frss)/1e6:6.0f} MB {(rss-frss)/size:4.2f}x")
        print(f"x: times the model's {size/1e6:.0f} MB")
        ref = outs['ckpt_avg average_to_file']
        for name, out in outs.items():
            if out == ref: continue
            keys, exact, worst, share = compare(ref, out)
            print(f"{name} against ckpt_avg: same tensors and dtypes {keys}, bit-identical {exact}, max |difference| {worst:.3g}, elements that differ {share:.2e}")
        if 'mergekit-yaml linear' in methods:
            v = subprocess.run([str(Path(a.mergekit).parent/'python'), '-c', "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('mergekit', 'transformers', 'torch')), sep=', ')"],
                               capture_output=True, text=True)
            print(f"mergekit venv: {v.stdout.strip() or 'versions unknown'}; options: {' '.join(opts)}")
    finally: shutil.rmtree(tmp); runner.p.stdin.close(); runner.p.wait()


if __name__ == '__main__': main()
