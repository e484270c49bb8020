"""SQL text the platform builds itself."""


def sql_literal(text) -> str:
    """``text`` (a path, usually) as a SQL string literal, for the statements that take no
    parameters (ATTACH, a view's definition)."""
    return "'" + str(text).replace("'", "''") + "'"
