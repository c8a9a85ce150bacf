"""gatenorm: data-free attention-sublayer pruning (Gate-Norm) and edge export for decoder-only LLMs.

The data flows one way: read (``gatenorm.readers``) -> score (``gatenorm.scoring``) -> plan
(``gatenorm.plan``) -> apply (``gatenorm.apply``) / export (``exporters``).
"""

__version__ = "0.1.0"
