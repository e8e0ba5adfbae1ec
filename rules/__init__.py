"""memlint's lint rules, one module per rule (installed as ``memlint.rules``).

Each module defines one :class:`memlint.rules.base.Rule` subclass; :func:`all_rules`
finds them, so adding a rule is adding a module.
"""
from memlint.rules.base import Rule, RuleContext, all_rules, get_rule

__all__ = ["Rule", "RuleContext", "all_rules", "get_rule"]
