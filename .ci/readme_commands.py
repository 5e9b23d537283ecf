"""Print one of the README's two commands, exactly as written: `main` (the first ```sh block under
"The two commands") or `test` (the second). CI runs them from here, so they cannot drift apart."""

import re
import sys
from pathlib import Path

readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
blocks = [b.strip() for b in re.findall(r"```sh\n(.*?)```", section, flags=re.S)]
if len(blocks) != 2 or any("\n" in b for b in blocks):
    sys.exit("README.md: 'The two commands' must hold exactly two one-line ```sh blocks")
print(blocks[{"main": 0, "test": 1}[sys.argv[1]]])
