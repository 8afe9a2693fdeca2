#!/usr/bin/env python3
"""Render nbs/index.ipynb to README.md with only the standard library (Quarto, which `nbdev_readme` needs, is not
installable here). Markdown cells are copied verbatim, code cells become ```python blocks and their stored text
outputs plain ``` blocks. A code cell with `#| hide` or `#| include: false` is left out; other nbdev directive lines
(`#| eval: false`, `#| notest`, ...) are dropped from the code shown.

    python tools/make_readme.py          # write README.md
    python tools/make_readme.py --check  # exit 1 if README.md differs from what index.ipynb gives
"""
import argparse, difflib, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK, README = ROOT/'nbs'/'index.ipynb', ROOT/'README.md'
_directive = re.compile(r'^\s*#\|\s*(.*?)\s*$')
_hidden = {'hide', 'include: false', 'include:false'}

def _text(o): return ''.join(o) if isinstance(o, list) else (o or '')

def _split_directives(src):
    "The directives at the top of a code cell's source, and the code after them"
    lines = src.splitlines()
    n = 0
    while n < len(lines) and _directive.match(lines[n]): n += 1
    return [_directive.match(l).group(1) for l in lines[:n]], '\n'.join(lines[n:]).strip('\n')

def _output_text(out):
    "An output's plain text, or None for what has no useful text form (HTML tables, images, ...)"
    if out.get('output_type') == 'stream': return _text(out.get('text'))
    if out.get('output_type') in ('execute_result', 'display_data'):
        txt = _text(out.get('data', {}).get('text/plain'))
        return None if re.fullmatch(r'<(IPython|fastprogress)\..*>', txt.strip()) else txt
    return None  # errors do not belong in a README

def _block(lang, text): return f"```{lang}\n{text.rstrip()}\n```"

def render(nb:dict)->str:
    "README.md's text for notebook `nb`"
    parts = []
    for cell in nb['cells']:
        src = _text(cell.get('source'))
        if cell['cell_type'] == 'markdown': parts.append(src.strip('\n'))
        elif cell['cell_type'] == 'code':
            directives, code = _split_directives(src)
            if _hidden & set(directives): continue
            if code.strip(): parts.append(_block('python', code))
            texts = [t for t in map(_output_text, cell.get('outputs', [])) if t and t.strip()]
            if texts: parts.append(_block('', ''.join(texts)))
    return '\n\n'.join(p for p in parts if p.strip()) + '\n'

def main(argv=None)->int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--check', action='store_true', help='only compare; exit 1 if README.md is out of date')
    args = p.parse_args(argv)
    want = render(json.loads(NOTEBOOK.read_text(encoding='utf-8')))
    if not args.check:
        README.write_text(want, encoding='utf-8')
        print(f"wrote {README.relative_to(ROOT)} from {NOTEBOOK.relative_to(ROOT)}")
        return 0
    have = README.read_text(encoding='utf-8') if README.exists() else ''
    if have == want:
        print("README.md matches nbs/index.ipynb")
        return 0
    diff = list(difflib.unified_diff(have.splitlines(), want.splitlines(), 'README.md (on disk)', 'README.md (from nbs/index.ipynb)', lineterm=''))
    print('\n'.join(diff[:40] + ([f'... ({len(diff)-40} more diff lines)'] if len(diff) > 40 else [])))
    print("README.md is out of date with nbs/index.ipynb: run `python tools/make_readme.py` and commit README.md", file=sys.stderr)
    return 1

if __name__ == '__main__': sys.exit(main())
