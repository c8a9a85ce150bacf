"""The methods study on SmolLM2-135M (docs/study.md): `run` measures every registered method's plans
(stages rank, time, quality, speed, zeroshot), `report` writes docs/study.md and its figures from the
results JSON only, `common` holds what both read. `scripts/study_methods.py` and `scripts/study_report.py`
are command lines over `gatenorm.study.run.main`."""
