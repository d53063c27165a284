"""Write Megatron-LM's GPT training flag table (megatron_lite/arguments/megatron_flags.json) from its source.

A maintainer's tool, not needed to train: run it when Megatron-LM changes its flags, then
`python tools/megatron_compat_table.py` regenerates docs/megatron-compatibility.md.

    python tools/extract_megatron_flags.py --source core_v0.15.0=/src/Megatron-LM-0.15 \
        --source HEAD=/src/Megatron-LM --output megatron_lite/arguments/megatron_flags.json

Each source is a checkout (its `megatron/` package is imported in a subprocess of its own and
`add_megatron_arguments`, plus ModelOpt's `add_modelopt_args` that its pretrain_gpt.py adds, is run on a
fresh parser). The later source's definition of a flag wins; the table
records every version that has it. Modules that need a GPU-only package (triton) are replaced by empty
stand-ins only as far as importing the argument definitions requires.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# Runs inside the subprocess: import Megatron's arguments module and print its actions as JSON.
_DUMP = r"""
import argparse, enum, importlib.abc, importlib.machinery, json, sys, types, typing, warnings
warnings.filterwarnings("ignore")
typing.override = getattr(typing, "override", lambda f: f)  # Python 3.12 name used by newer Megatron
stubbed = set(json.loads(sys.argv[2]))

class _Stub(types.ModuleType):
    __path__ = []
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(name)
    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Stub("call")

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self, is_package=True) if name in stubbed else None
    def create_module(self, spec):
        return _Stub(spec.name)
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Finder())
sys.path.insert(0, sys.argv[1])
from megatron.training.arguments import add_megatron_arguments

def plain(value):
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)

parser = argparse.ArgumentParser(allow_abbrev=False)
add_megatron_arguments(parser)
try:  # pretrain_gpt.py adds ModelOpt's flags when nvidia-modelopt is installed
    from megatron.post_training.arguments import add_modelopt_args
except ImportError:
    add_modelopt_args = None
if add_modelopt_args is not None:
    add_modelopt_args(parser)
rows = []
for group in parser._action_groups:
    for action in group._group_actions:
        if not action.option_strings or action.dest == "help":
            continue
        kind = getattr(action.type, "__name__", None) if action.type is not None else None
        rows.append({
            "flags": list(action.option_strings), "dest": action.dest,
            "action": type(action).__name__, "type": kind, "default": plain(action.default),
            "choices": plain(list(action.choices)) if action.choices is not None else None,
            "nargs": action.nargs, "const": plain(action.const), "group": group.title,
        })
import dataclasses
from megatron.core.transformer import TransformerConfig
fields = {}
for f in dataclasses.fields(TransformerConfig):
    default = f.default if f.default is not dataclasses.MISSING else None
    fields[f.name] = plain(default)
print(json.dumps({"flags": rows, "transformer_config": fields}))
"""

_ACTIONS = {
    "_StoreAction": "store",
    "_StoreTrueAction": "store_true",
    "_StoreFalseAction": "store_false",
    "_StoreConstAction": "store_const",
    "_AppendAction": "append",
    "BooleanOptionalAction": "boolean_optional",
}


def _dump(source: Path) -> dict:
    """Megatron's actions for one checkout, stubbing the modules that import triton until it imports."""
    stubbed: list[str] = []
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for _ in range(40):
        proc = subprocess.run(
            [sys.executable, "-c", _DUMP, str(source), json.dumps(stubbed)],
            capture_output=True,
            text=True,
            env=env,
            cwd=source,
        )
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        if "No module named 'triton'" not in proc.stderr:
            sys.exit(f"{source}: importing megatron.training.arguments failed:\n{proc.stderr[-2000:]}")
        frames = [ln for ln in proc.stderr.splitlines() if f"{source}/megatron/" in ln and 'File "' in ln]
        path = frames[-1].split('"')[1]
        module = Path(path).relative_to(source).with_suffix("").as_posix().replace("/", ".")
        stubbed.append(module)
    sys.exit(f"{source}: gave up after stubbing {stubbed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--source", action="append", required=True, help="NAME=DIR, oldest first")
    parser.add_argument("--output", required=True, help="the flag table (JSON)")
    parser.add_argument(
        "--config-output", required=True, help="TransformerConfig's field names and defaults (JSON), for YAML"
    )
    args = parser.parse_args()
    table: dict[str, dict] = {}
    config_fields: dict[str, object] = {}
    for spec in args.source:
        name, _, directory = spec.partition("=")
        dump = _dump(Path(directory).resolve())
        config_fields.update(dump["transformer_config"])
        for row in dump["flags"]:
            row["action"] = _ACTIONS.get(row["action"], row["action"])
            # A later version may rename or merge options: its row replaces every row sharing an option.
            overlapping = [k for k, r in table.items() if set(r["flags"]) & set(row["flags"])]
            versions = sorted({v for k in overlapping for v in table.pop(k)["versions"]})
            row["versions"] = versions + [name]
            table[row["flags"][0]] = row
    out = Path(args.output)
    tmp = out.with_suffix(".tmp")
    rows = sorted(table.values(), key=lambda r: r["flags"][0])
    tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")  # a row a line: readable diffs
    tmp.replace(out)
    cfg_out = Path(args.config_output)
    tmp = cfg_out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(config_fields.items())), indent=0) + "\n")
    tmp.replace(cfg_out)
    print(f"{len(table)} flags -> {out}; {len(config_fields)} TransformerConfig fields -> {cfg_out}")


if __name__ == "__main__":
    main()
