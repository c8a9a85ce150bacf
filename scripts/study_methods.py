"""The methods study on SmolLM2-135M (docs/study.md): a command line over `gatenorm.study.run`.

python scripts/study_methods.py                  # every stage; the defaults are docs/study.md's settings
python scripts/study_methods.py --stages rank,quality --methods gate-norm,mixed-synthetic
"""

from gatenorm.study.run import main

if __name__ == "__main__":
    main()
