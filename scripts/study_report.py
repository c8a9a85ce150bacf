"""Rewrite docs/study.md and its figures from the study's results JSON only (no measurement): the ``report``
stage of `gatenorm.study.run`; takes the same flags (``--cache``, ``--docs``, ...)."""

import sys

from gatenorm.study.run import main

if __name__ == "__main__":
    main(["--stages", "report", *sys.argv[1:]])
