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


def test_a_waiter_that_found_no_core_spare_looks_again_soon_and_spins_once_one_is(monkeypatch):
    """One more runnable task for a moment must not keep the spin off for a whole SPARE_CHECK_NS."""
    clock = [10 ** 12]
    monkeypatch.setattr(shm_wait.time, "monotonic_ns", lambda: clock[0])
    spare = [True]
    monkeypatch.setattr(shm_wait, "spare_core", lambda own_tasks: spare[0])
    spin = shm_wait.Spin(yields=False, own_tasks=2)
    assert spin.ns() > 0
    spare[0] = False
    clock[0] += shm_wait.SPARE_CHECK_NS
    assert spin.ns() == 0  # no core spare: sleep at once
    spare[0] = True
    clock[0] += shm_wait.SPARE_RECHECK_NS - 1
    assert spin.ns() == 0
    clock[0] += 1
    assert spin.ns() > 0  # looked again after SPARE_RECHECK_NS, not SPARE_CHECK_NS
    spare[0] = False
    clock[0] += shm_wait.SPARE_RECHECK_NS
    assert spin.ns() > 0  # while spinning, the next look is SPARE_CHECK_NS away


def test_inside_a_collective_a_waiter_spins_the_longest_however_short_its_arrival_spin_while_a_core_is_spare(monkeypatch):
    spare = [True]
    monkeypatch.setattr(shm_wait, "spare_core", lambda own_tasks: spare[0])
    spin = shm_wait.Spin(yields=False, own_tasks=2)
    for _ in range(20):
        spin.answered(False, 10 ** 9)  # long arrivals (the peer computes): the arrival spin at its shortest
    assert spin.ns() == shm_wait.MIN_SPIN_NS and spin.inside_ns() == shm_wait.MAX_SPIN_NS
    assert shm_wait.Spin(yields=True, own_tasks=4).inside_ns() == shm_wait.MAX_OVERSUBSCRIBED_SPIN_NS
    spare[0] = False
    spin = shm_wait.Spin(yields=False, own_tasks=2)
    assert spin.inside_ns() == 0  # no core spare: no spin anywhere
