"""Files of the OpenAI API (``/v1/files``) in Redis, durable like the batch jobs they feed.

Keys:

``duopool:file:{id}`` (HASH)
    ``id``, ``bytes``, ``created_at``, ``filename``, ``purpose``, ``owner`` (the API key's owner tag),
    ``kind``: ``upload`` (content in ``:data``) or ``batch_output`` / ``batch_error`` (content rendered from
    the batch's results, see ``batches``), and for those ``batch_id``.
``duopool:file:{id}:data`` (LIST)
    The uploaded bytes in chunks of at most ``CHUNK`` bytes. While an upload is in flight the list carries a
    TTL, so an upload cut off half-way (client gone, router killed) leaves nothing behind once it lapses; the
    file exists only from the step that writes its record and lifts the TTL (one MULTI).
``duopool:files:{owner}`` (ZSET)
    The owner's file ids by creation time (listing, pagination).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

FILE = "duopool:file:{}"
DATA = "duopool:file:{}:data"
OWNER_FILES = "duopool:files:{}"
CHUNK = 1 << 20
UPLOAD_TTL_S = 3600
PURPOSES = ("batch", "batch_output", "fine-tune", "assistants", "vision", "user_data", "evals")


class FileTooLarge(Exception):
    pass


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


def file_object(h: dict) -> dict:
    """The OpenAI ``file`` object of a record."""
    return {"id": h["id"], "object": "file", "bytes": int(h.get("bytes", 0)), "created_at": int(float(h["created_at"])),
            "filename": h.get("filename", ""), "purpose": h.get("purpose", "batch"), "status": "processed",
            "expires_at": None, "status_details": None}


class FileStore:
    def __init__(self, r: aioredis.Redis, raw: aioredis.Redis) -> None:
        self.r = r  # records (decoded strings)
        self.raw = raw  # content (bytes: a file need not be UTF-8 to be stored)

    async def upload(self, owner: str, filename: str, purpose: str, chunks: AsyncIterator[bytes],
                     limit: int) -> dict:
        """Stores the bytes ``chunks`` yields; raises FileTooLarge past ``limit`` bytes (nothing is kept)."""
        fid = new_file_id()
        data = DATA.format(fid)
        size = 0
        buf = bytearray()
        try:
            async for piece in chunks:
                size += len(piece)
                if size > limit:
                    raise FileTooLarge(f"file larger than {limit / 1e6:.0f} MB")
                buf += piece
                while len(buf) >= CHUNK:
                    await self._push(data, bytes(buf[:CHUNK]))
                    del buf[:CHUNK]
            if buf:
                await self._push(data, bytes(buf))
            now = time.time()
            record = {"id": fid, "bytes": size, "created_at": now, "filename": filename, "purpose": purpose,
                      "owner": owner, "kind": "upload"}
            async with self.r.pipeline(transaction=True) as p:
                p.hset(FILE.format(fid), mapping=record)
                p.persist(data)
                p.zadd(OWNER_FILES.format(owner), {fid: now})
                await p.execute()
            return record
        except BaseException:
            await self.r.delete(data)
            raise

    async def _push(self, key: str, chunk: bytes) -> None:
        async with self.raw.pipeline(transaction=True) as p:
            p.rpush(key, chunk)
            p.expire(key, UPLOAD_TTL_S)
            await p.execute()

    async def get(self, owner: str, fid: str) -> dict | None:
        """The record of ``fid`` if ``owner`` may see it."""
        if not fid.startswith("file-") or len(fid) > 128:
            return None
        h = await self.r.hgetall(FILE.format(fid))
        if not h or h.get("owner") != owner:
            return None
        return h

    async def chunks(self, fid: str) -> AsyncIterator[bytes]:
        """An uploaded file's bytes, chunk by chunk (memory: one chunk)."""
        key = DATA.format(fid)
        i = 0
        while True:
            part = await self.raw.lrange(key, i, i)
            if not part:
                return
            yield part[0]
            i += 1

    async def lines(self, fid: str) -> AsyncIterator[bytes]:
        """An uploaded file's lines (without the newline), streamed."""
        rest = b""
        async for chunk in self.chunks(fid):
            rest += chunk
            *done, rest = rest.split(b"\n")
            for line in done:
                yield line
        if rest:
            yield rest

    async def delete(self, owner: str, fid: str) -> bool:
        h = await self.get(owner, fid)
        if h is None:
            return False
        async with self.r.pipeline(transaction=True) as p:
            p.delete(FILE.format(fid), DATA.format(fid))
            p.zrem(OWNER_FILES.format(owner), fid)
            await p.execute()
        return True

    async def list(self, owner: str, limit: int, after: str | None, ascending: bool,
                   purpose: str | None) -> tuple[list[dict], bool]:
        """A page of the owner's files (newest first unless ``ascending``) after the id ``after``; and
        whether more follow. Raises KeyError if ``after`` is not one of the owner's files."""
        key = OWNER_FILES.format(owner)
        start = 0
        if after:
            rank = await (self.r.zrank(key, after) if ascending else self.r.zrevrank(key, after))
            if rank is None:
                raise KeyError(after)
            start = rank + 1
        out: list[dict] = []
        while len(out) <= limit:
            ids = await (self.r.zrange(key, start, start + 2 * limit) if ascending
                         else self.r.zrevrange(key, start, start + 2 * limit))
            if not ids:
                break
            start += len(ids)
            async with self.r.pipeline(transaction=False) as p:
                for fid in ids:
                    p.hgetall(FILE.format(fid))
                records = await p.execute()
            out += [h for h in records if h and (purpose is None or h.get("purpose") == purpose)]
        return out[:limit], len(out) > limit
