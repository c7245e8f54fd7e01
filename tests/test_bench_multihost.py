"""`ringpipe bench multihost` on two shaped namespace hosts, at the smallest sizes (marker multihost;
about 15 s): every row has its numbers, and the table shows them."""
import pytest

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(240)]


def test_the_multihost_benchmark_measures_busbw_cpu_and_hidden_all_reduce_per_setup():
    from ringpipe.tools.bench_multihost import format_table, run
    from ringpipe.tools.namespace_hosts import NamespaceError

    try:
        result = run(host_counts=(2,), rates=("1gbit",), size=1 << 20, iterations=1, rounds=1, steps=1, n_layer=1,
                     n_embd=32, block_size=16, batch_per_rank=2, bucket_bytes=16 << 10)
    except NamespaceError as exc:
        pytest.skip(f"no namespace hosts here: {exc}")
    [row] = result["rows"]
    assert (row["hosts"], row["rate"]) == (2, "1gbit")
    assert row["busbw_bytes_s"] > 0 and row["cpu_s"] > 0 and 0 < row["hidden"] <= 1
    # 2(n-1)/n × the gradients' bits / the shaped rate: what the ring needs at the link's speed
    assert row["link_s"] == pytest.approx(result["gradient_bytes"] * 8 / 1e9)
    table = format_table(result)
    assert "1 MiB" in table and f"{row['of_rate']:.0%}" in table.splitlines()[-1]
