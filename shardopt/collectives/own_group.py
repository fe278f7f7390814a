"""The gloo process group shardopt's collectives run on: one of its own per user group and timeout.

A collective that never completes (a rank died or stopped calling) fails shardopt's wait after its
timeout, but gloo's worker thread stays blocked in it until the *group's* timeout (30 minutes by
default), and a process cannot end before that thread does: ``~ProcessGroupGloo`` joins it at
``destroy_process_group()`` or at interpreter exit. On a group of its own whose timeout is shardopt's,
the thread is released soon after the error, whatever timeout the user's group has. NCCL keeps the
user's group: its watchdog enforces that group's timeout, and its destructor aborts the communicators.
"""

from __future__ import annotations

import weakref
from datetime import timedelta

import torch.distributed as dist

# How much longer than shardopt's timeout our group's own is, at most (and at most that timeout again):
# gloo counts from when its worker starts a collective, shardopt from when it waits for it, which can be
# later (a gradient reduction issued in backward, waited in step()), so shardopt's wait fails first, with
# its message naming the ranks that did not answer; the worker thread is released this much later.
RELEASE_AFTER = timedelta(seconds=10)

# Created on first use and kept while the user's group lives (weak keys): every optimizer over the
# same group with the same timeout shares one, so that a job (or a test session) holds a few at most.
_OWN: weakref.WeakKeyDictionary[dist.ProcessGroup, dict[timedelta, dist.ProcessGroup]] = weakref.WeakKeyDictionary()


def own_group(group: dist.ProcessGroup, timeout: timedelta) -> dist.ProcessGroup:
    """The group shardopt's collectives over ``group``'s ranks use (collective over them on first use)."""
    if dist.get_backend(group) != "gloo" or dist.get_world_size(group) == 1:
        return group
    groups = _OWN.setdefault(group, {})
    if timeout not in groups:
        groups[timeout] = dist.new_group(
            dist.get_process_group_ranks(group),
            timeout=timeout + min(timeout, RELEASE_AFTER),
            backend="gloo",
            use_local_synchronization=True,
        )
    return groups[timeout]


def own_groups() -> list[dist.ProcessGroup]:
    """The groups :func:`own_group` created that are still alive: state a process keeps on purpose."""
    return [group for groups in list(_OWN.values()) for group in groups.values()]
