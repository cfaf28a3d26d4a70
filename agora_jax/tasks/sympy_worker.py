"""Symbolic equivalence of two expressions, in a process of its own so that a slow case can be killed.

`SympyWorker` (used by `math_equiv`) starts this file as a script and talks to it over pipes: one
JSON request per line {"a": str, "b": str, "equation": bool}, one reply per line, "1" or "0". The
inputs are sanitized sympy-syntax strings from `math_equiv.latex_to_sympy`; they are parsed by
`parse_expr` in a namespace holding only numbers, symbols and a few functions (no builtins), and
compared numerically at fixed random points.
"""

from __future__ import annotations

import atexit
import json
import random
import select
import subprocess
import sys
import threading
from pathlib import Path

_NAMES = ("Symbol", "Integer", "Float", "Rational", "sqrt", "sin", "cos", "tan", "cot", "sec",
          "csc", "asin", "acos", "atan", "log", "exp", "pi", "oo", "I")
_POINTS = 3
_REL_TOL = 1e-6


def _close(x: complex, y: complex) -> bool:
    return abs(x - y) <= _REL_TOL * max(abs(x), abs(y)) + 1e-12


def equivalent(a: str, b: str, equation: bool = False) -> bool:
    """True when a == b at every sample point (for equations: (lhs - rhs) proportional)."""
    import cmath

    import sympy
    from sympy.parsing.sympy_parser import auto_number, auto_symbol, parse_expr

    namespace = {name: getattr(sympy, name) for name in _NAMES} | {"__builtins__": {}}
    ea, eb = (parse_expr(s, local_dict={}, global_dict=namespace, transformations=(auto_symbol, auto_number))
              for s in (a, b))
    if not equation and ea == eb:
        return True
    symbols = sorted(ea.free_symbols | eb.free_symbols, key=str)
    rng = random.Random(0)
    n_points = _POINTS if symbols else 1
    points = [{s: sympy.Float(rng.uniform(0.5, 2.5)) for s in symbols} for _ in range(n_points)]
    pairs = [(complex(ea.evalf(30, subs=p)), complex(eb.evalf(30, subs=p))) for p in points]
    if not all(cmath.isfinite(x) and cmath.isfinite(y) for x, y in pairs):
        return False
    if not equation:
        return all(_close(x, y) for x, y in pairs)
    if any(y == 0 or x == 0 for x, y in pairs):
        return False
    ratios = [x / y for x, y in pairs]
    return all(_close(r, ratios[0]) for r in ratios)


def _serve() -> None:
    equivalent("x", "x")  # imports sympy before announcing readiness
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            ok = equivalent(request["a"], request["b"], request["equation"])
        except Exception:  # any parse/evaluation failure means equivalence was not shown
            ok = False
        print("1" if ok else "0", flush=True)


class SympyWorker:
    """Client of one worker process; a call that exceeds its timeout kills the worker (answer: False)."""

    def __init__(self, timeout_s: float = 5.0, start_timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _readline(self, timeout_s: float) -> str | None:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        return self._proc.stdout.readline() if ready else None

    def _ensure_started(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-u", str(Path(__file__).resolve())],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            if self._readline(self.start_timeout_s) != "ready\n":
                self.close()
                raise RuntimeError("the sympy worker process did not start")
        return self._proc

    def equivalent(self, a: str, b: str, equation: bool = False) -> bool:
        with self._lock:
            proc = self._ensure_started()
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"a": a, "b": b, "equation": equation}) + "\n")
            proc.stdin.flush()
            reply = self._readline(self.timeout_s)
            if reply is None or not reply:  # too slow, or crashed: restart on the next call
                self.close()
                return False
            return reply.strip() == "1"

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


if __name__ == "__main__":
    _serve()
