"""Recipes: a YAML file describes a batch of pruned, exported, validated variants; ``gatenorm run`` builds it.

Modules: `schema` (the recipe), `loader` (YAML with line numbers in errors), `sources`, `batch` (the
variants and their content keys), `search` (target budgets), `build` (one variant's steps), `executor`
(process pool, Ray), `report` and `plots` (REPORT.md, manifest.json), `card` (model cards), `command`.
"""
