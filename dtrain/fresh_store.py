"""``init_process_group`` on a TCPStore made for this attempt, not on torchrun's long-lived one.

Why: torchrun's agent keeps one rendezvous TCPStore for its whole life and, by default, hands it
to the workers of every attempt (``TORCHELASTIC_USE_AGENT_STORE=True``) with no per-attempt prefix.
gloo publishes each rank's address under the same keys every time, so after ``--max-restarts``
restarts a group a new worker can read a *dead* peer's address before the peer republishes it:
"Gloo connectFullMesh failed ... Connection refused", or a hang in waitUntilConnected. (Setting
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for the agent avoids it; this protects a plain ``torchrun``.)
:func:`dtrain.dist.setup` calls :func:`init_on_fresh_store` when the agent shares its store.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist

_STORE_NOTICE = "dtrain/init_store"  # in torchrun's store: "<port> <nonce>" of this attempt's fresh store
_STORE_NONCE = "dtrain/nonce"  # in the fresh store: proves a published address is this attempt's
_PROBE_TIMEOUT = datetime.timedelta(seconds=2)  # per try to connect to a posted address
_fresh_stores: list[Any] = []  # rank 0's store server must live as long as the process group


def init_on_fresh_store(
    backend: str, rank: int, world_size: int, timeout: datetime.timedelta, device_id: torch.device | None
) -> None:
    """``init_process_group`` on a store made for this attempt (see the module's docstring for why).

    How: global rank 0 starts a new TCPStore server on a free port and posts "<port> <nonce>" in the
    agent's store; the others connect only to a server that answers and holds the posted nonce. A notice
    left by an earlier attempt points at a server that died with that attempt's rank 0 (torchrun stops all
    workers before it starts new ones), so it is refused and the reader waits for the new notice.
    MASTER_ADDR is the host of the rendezvous' rank-0 node, where global rank 0 runs.
    """
    host = os.environ["MASTER_ADDR"]
    deadline = time.monotonic() + timeout.total_seconds()
    notice_board = dist.TCPStore(host, int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        _fresh_stores.append(store)
        nonce = uuid.uuid4().hex
        store.set(_STORE_NONCE, nonce)  # before the notice, so that a fresh notice is always valid
        notice_board.set(_STORE_NOTICE, f"{store.port} {nonce}")
    else:
        store = None
        while store is None:
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"rank {rank}: rank 0 posted no live store within {timeout}")
            port, nonce = notice_board.get(_STORE_NOTICE).decode().split()  # waits for the first notice
            try:  # a dead server refuses a plain connection at once; a TCPStore client would retry and log
                socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT.total_seconds()).close()
            except OSError:
                time.sleep(0.1)  # an earlier attempt's notice: wait for this attempt's rank 0
                continue
            try:  # the port may have been reused since: accept only this attempt's nonce
                candidate = dist.TCPStore(host, int(port), is_master=False, timeout=_PROBE_TIMEOUT)
                if candidate.check([_STORE_NONCE]) and candidate.get(_STORE_NONCE).decode() == nonce:
                    candidate.set_timeout(timeout)
                    store = candidate
                    continue
            except RuntimeError:  # DistNetworkError / DistStoreError: an earlier attempt's server is gone
                pass
            time.sleep(0.1)
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore("default_pg", store),  # the key layout env:// would use
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device_id,
    )
