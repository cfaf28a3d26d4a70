"""Re-render `report.md` and `accuracy.png` of a run from its `results.json`:

    python launch/report.py workdir/debate-default
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from agora_jax.evolution.report import render  # noqa: E402


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        path = render(sys.argv[1])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
