"""Write docs/megatron-compatibility.md from the parser: every Megatron-LM flag and what it does here.

python tools/megatron_compat_table.py            # rewrite the page
python tools/megatron_compat_table.py --check    # exit 1 if the page is out of date (a test runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_lite.arguments.compat_table import render_compat_table  # noqa: E402
from megatron_lite.errors import run_cli  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "megatron-compatibility.md"


def main() -> int:
    text = render_compat_table()
    if "--check" in sys.argv[1:]:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE} is out of date: run python tools/megatron_compat_table.py", file=sys.stderr)
            return 1
        return 0
    tmp = PAGE.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(PAGE)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    run_cli(main)
