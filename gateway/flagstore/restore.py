"""Store loss: the generation marker, the replica's image of the store, and the restore from it
(DESIGN 7, "Store loss").

A Redis that comes back empty (restarted without persistence, flushed, failed over to an empty
replica) must not make the fleet forget its flags. Three pieces make that hold:

- The generation marker `{P}:meta` (a hash: `generation`, `created_at`, and after a restore
  `restored_by`, `restored_at`) is written with the first flag and removed by nothing but
  `gateway store reset`. Flags gone while the marker is there means they were deleted; flags
  gone with the marker means the store was lost.
- Every replica keeps an image of the store: every hash under the prefix (flag documents with
  their versions, rollout states, guard counts, shadow statistics, and whatever runtime keys a
  later version adds), field by field as Redis holds them. It is read in full on every timed
  resync (only while the marker is there, so an emptied store never replaces it) and kept
  current in between by the replica's own reads and writes. Streams (the audit, the pair logs)
  are not part of it.
- `RESTORE` writes an image back in one script, only if the marker is absent, and writes the
  marker in the same step: however many replicas find the store lost at once, exactly one
  restores it, and its audit event `store_restored` names it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

# An image: full Redis key -> {field: value}, every value text as Redis returns it.
Image = dict[str, dict[str, str]]

# restore(KEYS: meta, index, audit, hash...;
#         ARGV: replica, ts, generation, maxlen, channel, message, image JSON, audit...)
# image JSON: {"hashes": [[field, value, ...] per hash KEY in order], "flags": [flag key, ...]}
# -> 1 when this call restored, 0 when the marker was there (someone else did, or nothing was
# lost). A hash is replaced, not merged: writes that reached the empty store before the restore
# (a counter flush, say) are overwritten by the image, which holds the counts they started from.
RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local image = cjson.decode(ARGV[7])
for i, fields in ipairs(image['hashes']) do
  redis.call('DEL', KEYS[i + 3])
  if #fields > 0 then redis.call('HSET', KEYS[i + 3], unpack(fields)) end
end
for _, key in ipairs(image['flags']) do redis.call('SADD', KEYS[2], key) end
redis.call('HSET', KEYS[1], 'generation', ARGV[3], 'created_at', ARGV[2],
           'restored_by', ARGV[1], 'restored_at', ARGV[2])
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""

# reset(KEYS: meta, audit, key...; ARGV: generation, ts, maxlen, channel, message, audit...)
# Deletes every given key, starts a new generation (so the now empty store is not taken for a
# lost one) and audits the reset, all at once.
RESET = """
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'created_at', ARGV[2])
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
redis.call('PUBLISH', ARGV[4], ARGV[5])
return #KEYS - 2
"""


def new_generation() -> str:
    return uuid.uuid4().hex


def marker_fields(generation: str | None = None) -> dict[str, str]:
    """What `{P}:meta` holds when a store begins."""
    return {"generation": generation or new_generation(), "created_at": repr(time.time())}


def restore_arguments(image: Image, flag_prefix: str) -> tuple[list[str], str, list[str]]:
    """(hash keys, image JSON, flag keys) for `RESTORE`; `flag_prefix` is `{P}:flag:`."""
    keys = sorted(image)
    hashes = [[part for item in image[key].items() for part in item] for key in keys]
    flags = [key[len(flag_prefix) :] for key in keys if key.startswith(flag_prefix)]
    # cjson decodes an empty JSON array as an empty table, which ipairs walks as nothing.
    payload = json.dumps({"hashes": hashes, "flags": flags}, separators=(",", ":"))
    return keys, payload, flags


def flag_keys(image: Image, flag_prefix: str) -> list[str]:
    return sorted(key[len(flag_prefix) :] for key in image if key.startswith(flag_prefix))


def copy(image: Image) -> Image:
    return {key: dict(fields) for key, fields in image.items()}


def from_json(raw: Any) -> Image:
    """An image as stored in the snapshot file; ValueError when it is not one."""
    if not isinstance(raw, dict):
        raise ValueError("the store image must be a mapping of keys to hashes")
    image: Image = {}
    for key, fields in raw.items():
        if not isinstance(key, str) or not isinstance(fields, dict):
            raise ValueError(f"store image entry {key!r} is not a hash")
        if not all(isinstance(f, str) and isinstance(v, str) for f, v in fields.items()):
            raise ValueError(f"store image entry {key!r} holds a field that is not text")
        image[key] = dict(fields)
    return image


def without(image: Image, keys: Iterable[str]) -> None:
    for key in keys:
        image.pop(key, None)


__all__ = [
    "RESET",
    "RESTORE",
    "Image",
    "copy",
    "flag_keys",
    "from_json",
    "marker_fields",
    "new_generation",
    "restore_arguments",
    "without",
]
