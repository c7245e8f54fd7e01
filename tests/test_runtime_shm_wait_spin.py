"""How long a same-host waiter spins (runtime/shm_wait.Spin) when this job has more ranks on the
host than cores: briefly, then it sleeps and frees the core a peer needs."""
from ringpipe.runtime import shm_wait


def spinning_spin(monkeypatch, yields: bool) -> shm_wait.Spin:
    monkeypatch.setattr(shm_wait, "spare_core", lambda own_tasks: True)
    return shm_wait.Spin(yields=yields, own_tasks=4)


def test_with_more_ranks_than_cores_a_waiter_never_spins_longer_than_the_oversubscribed_limit(monkeypatch):
    spin = spinning_spin(monkeypatch, yields=True)
    for waited in (5_000, 15_000, 19_000):  # sleeps a longer spin would have caught: spin longer
        spin.answered(False, waited)
    for _ in range(20):
        spin.answered(True)
    assert spin.ns() == shm_wait.MAX_OVERSUBSCRIBED_SPIN_NS < shm_wait.MAX_SPIN_NS


def test_with_more_ranks_than_cores_a_wait_longer_than_the_limit_shortens_the_spin(monkeypatch):
    spin = spinning_spin(monkeypatch, yields=True)
    before = spin.ns()
    spin.answered(False, 60_000)  # the peer needed the core for a while: sleep sooner next time
    assert spin.ns() < before


def test_with_a_core_per_rank_a_waiter_may_spin_up_to_the_full_limit(monkeypatch):
    spin = spinning_spin(monkeypatch, yields=False)
    spin.answered(False, 60_000)  # a ping-pong turn of 60 µs: a longer spin catches the next one
    assert spin.ns() == 90_000
