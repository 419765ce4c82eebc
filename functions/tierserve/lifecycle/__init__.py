"""Model lifecycle: conditional writes to the store (``objects``), every change with its history
(``registry``), and progressive delivery with automatic rollback (``rollout``).

Shipped with the functions: the unattended rollout runs in AWS. Operator commands (``tierserve models``)
live in ``tierserve_tools.models_cli``.
"""
