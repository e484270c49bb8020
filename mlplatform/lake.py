"""The warehouse as a DuckLake (issue 18's deployment profile): DuckDB's lakehouse format, its
catalog in PostgreSQL (or, on one machine, a DuckDB file) and its data as Parquet files under a
shared directory.

DuckDB loads the ``ducklake`` and ``postgres`` extensions by downloading them from
extensions.duckdb.org the first time. Nothing is downloaded here: they come from PyPI's
``duckdb-extension-ducklake``, ``duckdb-extension-postgres-scanner`` and ``duckdb-extension-httpfs``
(for data on an object store) wheels in the lock, each
built for one DuckDB version (1.5.5, the pinned one). A wheel keeps its file under
``extensions/v<version>/``; DuckDB looks under ``<extension_directory>/v<version>/<platform>/``,
so ``install_extensions`` copies the files there, and every connection that may load them (ours
through ``extension_config``, dbt-duckdb's through its profile's ``config_options``) points
``extension_directory`` at that directory with autoinstall off. A missing file is then an error
naming the wheel, never a download.

What DuckLake does not have, and what the platform does instead (DuckLake 1.0 on DuckDB 1.5.5,
probed): no PRIMARY KEY / UNIQUE constraints, so no ``INSERT OR IGNORE`` / ``ON CONFLICT``
(de-duplication by anti-join or MERGE); no indexes, no sequences. Commits are optimistic: two
transactions that delete from (or replace a window of) the same table conflict at COMMIT even on
different partitions, ``duckdb.TransactionException`` "Transaction conflict"; the loser's
transaction is rolled back whole (``is_conflict``).
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import sys
from pathlib import Path

from mlplatform.sql import sql_literal

# A warehouse "database" starting with this is a DuckLake: ``ducklake:<catalog>`` (Settings.database)
LAKE_PREFIX = "ducklake:"
# Where the extensions are installed from their wheels: inside the environment that has the wheels,
# so a worker needs nothing but the environment (dbt gets it as MLPLATFORM_DUCKDB_EXTENSIONS)
EXTENSION_DIR = Path(sys.prefix) / "share" / "duckdb-extensions"

# extension name (as DuckDB loads it) -> the module of the PyPI wheel that carries its file
EXTENSION_WHEELS = {
    "ducklake": "duckdb_extension_ducklake",
    "postgres_scanner": "duckdb_extension_postgres_scanner",
    # the data on an object store (MLPLATFORM_LAKE_DATA_PATH=s3://...): installed, not tested here (no S3)
    "httpfs": "duckdb_extension_httpfs",
}


def duckdb_version() -> str:
    import duckdb

    return f"v{duckdb.__version__}"


@functools.cache
def platform() -> str:
    """DuckDB's name for this platform (``linux_amd64``), as it names the extension folders."""
    import duckdb

    with duckdb.connect() as conn:
        return conn.execute("PRAGMA platform").fetchone()[0]


def wheel_file(extension: str) -> Path:
    """The extension's file in its installed wheel, for the running DuckDB's version."""
    module = EXTENSION_WHEELS[extension]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the DuckDB extension {extension!r} needs the wheel {module.replace('_', '-')} "
                           f"(in requirements.lock: `make install`)")
    root = Path(next(iter(spec.submodule_search_locations))) / "extensions"
    path = root / duckdb_version() / f"{extension}.duckdb_extension"
    if not path.exists():
        found = sorted(p.name for p in root.iterdir()) if root.exists() else []
        raise RuntimeError(f"{module.replace('_', '-')} has no {extension} extension for duckdb {duckdb_version()} "
                           f"(it has: {', '.join(found) or 'none'}): the wheel and duckdb must be the same version")
    return path


def install_extensions(directory: Path) -> Path:
    """Copy the extensions' files from their wheels into ``directory`` as DuckDB lays them out
    (idempotent: a file of the same size is left alone). Returns ``directory``."""
    target = Path(directory) / duckdb_version() / platform()
    target.mkdir(parents=True, exist_ok=True)
    for extension in EXTENSION_WHEELS:
        source, copy = wheel_file(extension), target / f"{extension}.duckdb_extension"
        if not copy.exists() or copy.stat().st_size != source.stat().st_size:
            partial = copy.with_suffix(".partial")
            shutil.copyfile(source, partial)
            partial.replace(copy)  # another process never loads half a file
    return Path(directory)


def extension_config(directory: Path) -> dict:
    """The DuckDB configuration that loads the extensions from ``directory`` and never downloads:
    for ``duckdb.connect(config=...)`` and dbt-duckdb's ``config_options`` (set when the database
    opens, before any ATTACH)."""
    return {"extension_directory": str(directory), "autoinstall_known_extensions": False,
            "autoload_known_extensions": True}


def attach_sql(catalog: str, data_path: Path | None = None, alias: str = "lake") -> str:
    """The ATTACH of a DuckLake: ``catalog`` is ``postgres:dbname=... host=... user=...`` (the
    password from PGPASSWORD / PGPASSFILE, never in the string) or a DuckDB file's path."""
    if not alias.isidentifier():
        raise ValueError(f"a DuckLake alias is an identifier, not {alias!r}")
    options = f" (DATA_PATH {sql_literal(str(data_path).rstrip('/') + '/')})" if data_path is not None else ""
    return f"ATTACH {sql_literal(LAKE_PREFIX + catalog)} AS {alias}{options}"


def create_lake(catalog: str, data_path: Path, extensions: Path = EXTENSION_DIR) -> None:
    """Create the DuckLake (idempotent; its data path is kept in the catalog). A file catalog's
    folder and a local data path are made first."""
    if not catalog.startswith("postgres:"):
        Path(catalog).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in str(data_path):
        Path(data_path).mkdir(parents=True, exist_ok=True)
    connect_lake(catalog, data_path, extensions).close()


def is_lake(database) -> bool:
    return str(database).startswith(LAKE_PREFIX)


def connect_lake(catalog: str, data_path: Path | None = None, extensions: Path = EXTENSION_DIR,
                 alias: str = "lake", config: dict | None = None):
    """An in-memory DuckDB with the DuckLake attached as ``alias`` and used by default. The data
    path is needed once, when the lake is created (``create_lake``): the catalog keeps it."""
    import duckdb

    conn = duckdb.connect(config={**(config or {}), **extension_config(install_extensions(extensions))})
    try:
        conn.execute(attach_sql(catalog, data_path, alias))
        conn.execute(f"USE {alias}")
    except Exception:
        conn.close()
        raise
    return conn


def is_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is DuckLake refusing a commit because another transaction changed the
    same table first (the whole transaction was rolled back: run it again)."""
    import duckdb

    return isinstance(exc, duckdb.TransactionException) and "Transaction conflict" in str(exc)
