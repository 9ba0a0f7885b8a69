"""Per-platform tuning: a config's `platforms` table, applied once the devices are known.

A config file may carry the choices that are fastest on each kind of device, e.g.

    c.platforms = dict(
        gpu=dict(model=dict(remat="none", scan_layers=False), micro_batch_per_device=8),
        tpu=dict(model=dict(remat="save_matmuls"), micro_batch_per_device=16),
        cpu=dict(model=dict(scan_layers=False)),
    )

Keys are a platform ('cpu', 'gpu', 'tpu') or a piece of a device kind ('H100', 'TPU v5p'),
case-insensitive; the longest device-kind match wins over the platform. An entry holds config
overrides and optionally `micro_batch_per_device`, which sets optim.grad_accum_steps so that
each device sees that many rows per micro-batch: the global batch (the experiment) stays as
configured and only how it is split over time changes with the hardware. Keys given on the
command line always win: `load_config` removes them from every entry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from bigjax.config import (
    MESH_AXES,
    MICRO_BATCH,
    TrainConfig,
    from_configdict,
    full_mesh_shape,
    merge_groups,
    to_dict,
)
from bigjax.mesh import make_mesh


def select(table: Mapping[str, object], platform: str, device_kind: str) -> str:
    """The key of `table` that applies to these devices, or '' if none does."""
    kind = device_kind.lower()
    by_kind = [k for k in table if k.lower() not in ("cpu", "gpu", "tpu") and k.lower() in kind]
    if by_kind:
        return max(by_kind, key=len)
    return next((k for k in table if k.lower() == platform.lower()), "")


def tune(cfg: TrainConfig, platform: str, device_kind: str, num_devices: int) -> TrainConfig:
    """`cfg` with the entry of its `platforms` table for these devices applied (and the table
    replaced by the name of the entry used, so config.json says what ran)."""
    if not cfg.platforms:
        return cfg
    table = json.loads(cfg.platforms)
    key = select(table, platform, device_kind)
    raw = {**to_dict(cfg), "platforms": "", "platform": key}
    if not key:
        return from_configdict(raw)
    entry = dict(table[key])
    micro = entry.pop(MICRO_BATCH, 0)
    raw = merge_groups(raw, entry)
    if micro:
        raw["optim"]["grad_accum_steps"] = accumulation(raw, micro, num_devices)
    return from_configdict(raw)


def accumulation(raw: dict[str, Any], micro: int, num_devices: int) -> int:
    """Micro-batches per step so that each batch shard holds ~`micro` rows (at least one
    micro-batch; always a divisor of the batch that the shards divide)."""
    mesh = raw["mesh"]
    shape = list(full_mesh_shape(tuple(int(s) for s in mesh["shape"])))
    dcn = list(full_mesh_shape(tuple(int(s) for s in mesh.get("dcn_shape", (1,) * 3))))
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1) * math.prod(dcn)
        shape[shape.index(-1)] = max(num_devices // known, 1)
    sizes = {a: s * d for a, s, d in zip(MESH_AXES, shape, dcn, strict=True)}
    batch_axes = dict((k, tuple(v)) for k, v in raw["mesh"]["rules"].items())["act_batch"]
    shards = math.prod(sizes[a] for a in batch_axes)
    rows = raw["data"]["batch_size"]
    per_shard = max(rows // shards, 1)
    accum = max(per_shard // micro, 1)
    while rows % (accum * shards) and accum > 1:  # fewer, larger micro-batches until even
        accum -= 1
    return accum


def for_devices(cfg: TrainConfig, devices: Sequence[jax.Device]) -> TrainConfig:
    """`tune` for these (jax) devices: their platform, kind and count."""
    first = devices[0]
    return tune(cfg, first.platform, first.device_kind, len(devices))


def for_run(
    cfg: TrainConfig, devices: Sequence[jax.Device] | None = None
) -> tuple[TrainConfig, Mesh]:
    """The config tuned for these devices (its `platforms` entry) and its
    mesh over them: how every command (train, bench, plan, eval, serve) builds its mesh."""
    devices = list(jax.devices() if devices is None else devices)
    cfg = for_devices(cfg, devices)
    return cfg, make_mesh(cfg.mesh, devices)
