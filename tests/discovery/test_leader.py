"""Leader election on a Lease in the in-memory API server (resourceVersion-checked writes)."""

from __future__ import annotations

import asyncio

import pytest

from kube_helpers import start_api, wait_until

from epp.bench.kubeapi import KubeStore
from epp.discovery import resources as R
from epp.discovery.leader import LeaderElector, deployment_name, lease_name

NAME = lease_name("default", "pool")
TIMING = dict(lease_duration=1.0, renew_deadline=0.6, retry_period=0.1)


async def test_one_leader_takeover_on_expiry_and_on_release(tmp_path):
    store = KubeStore()
    api, client = await start_api(tmp_path, store)
    a = LeaderElector(client, "default", NAME, identity="a", **TIMING)
    b = LeaderElector(client, "default", NAME, identity="b", **TIMING)
    c = LeaderElector(client, "default", NAME, identity="c", **TIMING)
    tasks = {e: asyncio.create_task(e.run()) for e in (a, b, c)}
    try:
        await wait_until(lambda: sum(e.is_leader for e in (a, b, c)) == 1, what="a leader")
        for _ in range(5):  # stays exactly one while everyone retries
            await asyncio.sleep(0.1)
            assert sum(e.is_leader for e in (a, b, c)) == 1
        leader = next(e for e in (a, b, c) if e.is_leader)
        lease = store.get(R.LEASES, "default", NAME)
        assert lease["spec"]["holderIdentity"] == leader.identity and lease["spec"]["leaseDurationSeconds"] == 1

        # the leader dies without releasing: another takes over once the lease expired
        tasks.pop(leader).cancel()
        rest = [e for e in (a, b, c) if e is not leader]
        await wait_until(lambda: any(e.is_leader for e in rest), timeout=5, what="takeover after expiry")
        second = next(e for e in rest if e.is_leader)
        assert store.get(R.LEASES, "default", NAME)["spec"]["leaseTransitions"] == 1

    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await client.close()
        await api.stop()


async def test_release_hands_over_without_waiting_for_expiry(tmp_path):
    store = KubeStore()
    api, client = await start_api(tmp_path, store)
    # A 30 s lease: a takeover within the test's timeout can only come from the release.
    slow = dict(lease_duration=30.0, renew_deadline=20.0, retry_period=0.1)
    a = LeaderElector(client, "default", NAME, identity="a", **slow)
    b = LeaderElector(client, "default", NAME, identity="b", **slow)
    ta = asyncio.create_task(a.run())
    await wait_until(lambda: a.is_leader, what="a leads")
    tb = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(0.3)
        assert not b.is_leader
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        await a.release()
        assert not a.is_leader and store.get(R.LEASES, "default", NAME)["spec"]["holderIdentity"] == ""
        await wait_until(lambda: b.is_leader, timeout=10, what="takeover after release")
    finally:
        tb.cancel()
        await asyncio.gather(tb, return_exceptions=True)
        await client.close()
        await api.stop()


async def test_leader_steps_down_when_it_cannot_renew(tmp_path):
    api, client = await start_api(tmp_path)
    a = LeaderElector(client, "default", NAME, identity="a", **TIMING)
    task = asyncio.create_task(a.run())
    try:
        await wait_until(lambda: a.is_leader, what="leader")
        await api.stop()
        await wait_until(lambda: not a.is_leader, timeout=5, what="step down")
        await api.start()
        await wait_until(lambda: a.is_leader, timeout=5, what="leader again")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await api.stop()


def test_standalone_lease_is_named_after_the_deployment():
    assert deployment_name("vllm-epp-7d9f8c6b5-x2k4q") == "vllm-epp"
    assert lease_name("ml", deployment_name("epp-6c9d-abcde")) == "epp-ml-epp.llm-d.ai"
    for bad in ("", "epp", "epp-x", "epp--"):
        with pytest.raises(ValueError, match="cannot tell the Deployment"):
            deployment_name(bad)
