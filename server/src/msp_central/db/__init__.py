"""Storage: SQLAlchemy Core tables, the engine, Alembic migrations."""
