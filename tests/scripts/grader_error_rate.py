"""How often a ``grade`` function judges the public case table wrongly, per class.

Run it against this checkout, or against another one (an earlier grader) by putting that
checkout's ``src`` first on the path:

    PYTHONPATH=src python tests/scripts/grader_error_rate.py
    PYTHONPATH=/path/to/other/checkout/src python tests/scripts/grader_error_rate.py

Only the verdict (``correct``) is compared, so any grader with ``grade(response, gold,
**options)`` can be measured. A grader that raises on a case counts as wrong on it.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grading_cases import CASES, CLASSES  # noqa: E402

import vlm_probe  # noqa: E402
from vlm_probe.evaluation.grading import grade  # noqa: E402


def main() -> int:
    wrong, false_pass, false_fail, raised = Counter(), Counter(), Counter(), Counter()
    total = Counter(case.cls for case in CASES)
    for case in CASES:
        try:
            verdict = grade(case.response, case.gold, **case.options).correct
        except Exception:  # noqa: BLE001 - an error is a wrong verdict here
            wrong[case.cls] += 1
            raised[case.cls] += 1
            continue
        if verdict != case.correct:
            wrong[case.cls] += 1
            (false_pass if verdict else false_fail)[case.cls] += 1
    print(f"grader: {vlm_probe.__file__}")
    print(f"{'class':15} {'cases':>5} {'wrong':>5} {'false pass':>10} {'false fail':>10} {'raised':>6}")
    for cls in CLASSES:
        print(f"{cls:15} {total[cls]:5d} {wrong[cls]:5d} {false_pass[cls]:10d} {false_fail[cls]:10d} {raised[cls]:6d}")
    n, w = sum(total.values()), sum(wrong.values())
    print(f"{'all':15} {n:5d} {w:5d} {sum(false_pass.values()):10d} {sum(false_fail.values()):10d} "
          f"{sum(raised.values()):6d}   error rate {w / n:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
