"""Examples: a three-process cluster script, a gate client and a custom service.

This file makes ``examples`` a regular package, so ``--service examples.greeter:Greeter``
imports this directory's module even if some installed distribution ships a top-level
``examples`` package of its own.
"""
