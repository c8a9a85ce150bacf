"""Rewrite docs/study.md and its figures from the study's results JSON only (no measurement): the ``report``
stage of `gatenorm.study.run`; takes the same flags (``--cache``, ``--docs``, ...). The hand-written regions
of the existing docs/study.md are kept (`gatenorm.study.prose`).

    python scripts/study_report.py --heal-compare wiki-heldout   # docs/study.md as committed
"""

import sys

from gatenorm.study.run import main

if __name__ == "__main__":
    main(["--stages", "report", *sys.argv[1:]])
