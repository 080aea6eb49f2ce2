"""The Python original's side of `scripts/bench-python.sh`.

context-async-sqlalchemy on FastAPI with its pure-ASGI middleware, SQLAlchemy's asyncio engine
on asyncpg, one primary and one replica connect, pool 20 each. The Swift twin
(`Benchmarks/Sources/TwinServer`) serves the same four endpoints with the same SQL.
"""

import os

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from context_async_sqlalchemy import ASGIHTTPDBSessionMiddleware, DBConnect, db_session

USER = os.environ["POSTGRES_USER"]
PASSWORD = os.environ["POSTGRES_PASSWORD"]
DATABASE = os.environ["POSTGRES_DB"]


def engine_creator(read_only: bool):
    def create(host: str) -> AsyncEngine:
        return create_async_engine(
            f"postgresql+asyncpg://{USER}:{PASSWORD}@{host}/{DATABASE}",
            pool_size=20,
            max_overflow=0,
            # BEGIN READ ONLY on the replica, as the Swift twin's read-only connect sends.
            execution_options={"postgresql_readonly": True} if read_only else {},
        )

    return create


def create_session_maker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


primary = DBConnect(
    engine_creator=engine_creator(False),
    session_maker_creator=create_session_maker,
    host=os.environ["BENCH_PRIMARY"],
)
replica = DBConnect(
    engine_creator=engine_creator(True),
    session_maker_creator=create_session_maker,
    host=os.environ["BENCH_REPLICA"],
)

app = FastAPI()
app.add_middleware(ASGIHTTPDBSessionMiddleware)

WRITE = text("INSERT INTO example (text) VALUES (:text)")
READ = text("SELECT text FROM reads WHERE id = :id")


@app.post("/write")
async def write() -> dict:
    session = await db_session(primary)
    await session.execute(WRITE, {"text": "bench"})
    return {"ok": True}


@app.get("/read")
async def read(id: int) -> dict:
    session = await db_session(replica)
    row = (await session.execute(READ, {"id": id})).first()
    return {"text": row[0] if row else None}


@app.get("/read_write")
async def read_write(id: int) -> dict:
    session = await db_session(primary)
    await session.execute(WRITE, {"text": "bench"})
    row = (await (await db_session(replica)).execute(READ, {"id": id})).first()
    return {"text": row[0] if row else None}


@app.get("/noop")
async def noop() -> dict:
    return {"ok": True}
