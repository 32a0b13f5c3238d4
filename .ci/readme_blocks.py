"""Print the code block of README.md that follows `<!-- ci: NAME -->`, as written (CI runs it).

    python .ci/readme_blocks.py command-1     # bash build_env.sh && python api.py --model demo
    python .ci/readme_blocks.py --list        # the names README marks

README marks its commands for users with these (invisible) comments, so that CI runs exactly what README
says, not a copy of it that could drift. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"<!-- ci: ([\w-]+) -->\s*\n```[\w-]*\n(.*?)\n```", re.DOTALL)


def blocks(text: str) -> dict:
    found: dict = {}
    for name, code in _BLOCK.findall(text):
        if name in found:
            raise SystemExit(f"README.md marks two blocks as {name!r}")
        found[name] = code + "\n"
    return found


def main(argv: list) -> int:
    marked = blocks(README.read_text(encoding="utf-8"))
    if argv == ["--list"]:
        print("\n".join(marked))
        return 0
    if len(argv) != 1 or argv[0] not in marked:
        print(f"usage: python .ci/readme_blocks.py NAME|--list (README.md marks: {', '.join(marked)})", file=sys.stderr)
        return 2
    sys.stdout.write(marked[argv[0]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
