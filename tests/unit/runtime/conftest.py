"""Fixtures shared by the runtime's tests: the keys table on moto (``dynamodb``, ``key_store``) that the key
store's and the authorizer's tests both use.

Why a conftest: fixtures imported into a test module read as unused imports and redefinitions; here they are
found by name. A module's own fixture of the same name (``test_usage``'s ``dynamodb``) wins over these."""

from tests.support.keys_table import dynamodb, key_store  # noqa: F401
