"""`ringpipe plan`: ranked layouts with memory split and step time, refusals with their reasons,
machine files, and the bad-input cases as one error line."""
import json

import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.parallel.pipeline_parallel.simulator import theoretical_bubble
from ringpipe.model.planning.gpt2_inventory import GPT2Inventory
from ringpipe.model.planning.machine import load_machine
from ringpipe.model.planning.memory import Candidate
from ringpipe.model.planning.step_time import predict_step
from tests.conftest import one_error_line, run_cli

SMALL = ["--n-layer", 4, "--n-head", 4, "--n-embd", 64, "--block-size", 32, "--vocab", 256, "--batch-size", 8]


def test_plan_lists_the_top_layouts_ranked_with_memory_and_the_winner_explained(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("plan", *SMALL, "--nproc", 4, "--top", 3, "--json", out)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.strip()[:2] in ("1 ", "2 ", "3 ")]
    assert len(rows) == 3 and "W " in rows[0] and "pp0" in rows[0]
    assert " wins: " in result.output and "layouts fit; " in result.output
    layouts = json.loads(out.read_text())["layouts"]
    seconds = [entry["timing"]["seconds"] for entry in layouts]
    assert seconds == sorted(seconds) and len(layouts) == 3


def test_impossible_sizes_are_refused_each_with_its_reason_not_a_traceback():
    result = run_cli("plan", *SMALL[:2], "--n-head", 3, "--n-embd", 63, *SMALL[6:], "--nproc", 7, "--show-refused")
    line = one_error_line(result)
    assert "no layout" in line and "does not divide" in line
    assert "refused dp1 tp7 pp1: does not divide: tensor parallel: n_head 3 is not divisible by tp 7" in result.output
    assert "refused dp7 tp1 pp1: does not divide: global batch 8 is not divisible by dp 7" in result.output


def test_a_model_that_fits_no_layout_names_the_smallest_memory_it_would_need(tmp_path):
    machine = tmp_path / "tiny.json"
    machine.write_text(json.dumps({"name": "tiny", "kind": "gpu", "devices_per_host": 4, "peak_flops": 1e12,
                                   "memory_bytes": 1e5, "links": {"same_host": {"latency": 1e-5, "bandwidth": 1e9}}}))
    line = one_error_line(run_cli("plan", *SMALL, "--nproc", 4, "--machine", machine))
    assert "no layout of this model fits 4 ranks of tiny: the smallest per-rank memory it would need is" in line


def test_a_bad_machine_file_is_one_line_naming_the_file_and_field(tmp_path):
    machine = tmp_path / "bad.json"
    machine.write_text(json.dumps({"name": "bad", "kind": "gpu", "peak_flop": 1e12}))
    line = one_error_line(run_cli("plan", *SMALL, "--nproc", 2, "--machine", machine))
    assert str(machine) in line and "peak_flop" in line


def test_a_cluster_of_shipped_h100_nodes_is_planned_across_hosts():
    result = run_cli("plan", "--n-layer", 24, "--n-head", 16, "--n-embd", 2048, "--block-size", 2048,
                     "--batch-size", 16, "--dtype", "fp16-mixed", "--nproc", 8, "--hosts", 2,
                     "--machine", "h100-8x-node", "--top", 1)
    assert result.exit_code == 0, result.output
    assert "8x H100" in result.output and "not calibrated" not in result.output


def test_too_many_ranks_per_gpu_host_is_one_line():
    line = one_error_line(run_cli("plan", *SMALL, "--nproc", 16, "--machine", "h100-8x-node"))
    assert "16 ranks on a host of 8 devices" in line


@pytest.mark.parametrize("hosts", [3, 8])
def test_hosts_that_cannot_share_the_ranks_evenly_are_one_line(hosts):
    line = one_error_line(run_cli("plan", *SMALL, "--nproc", 4, "--hosts", hosts))
    assert "--hosts" in line and f"{hosts} hosts cannot share --nproc 4 ranks evenly" in line


def test_the_predicted_bubble_is_the_simulators_for_costs_without_communication():
    inventory = GPT2Inventory(GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=512, vocab_size=512))
    machine = load_machine("h100-8x-node")
    machine.links = {name: type(link)(0.0, 1e30) for name, link in machine.links.items()}
    timing = predict_step(inventory, Candidate(pp=4, microbatches=8), 32, machine)
    # stages are unequal (the head, the embedding), so the bubble is at least the balanced one
    assert timing.bubble_fraction >= theoretical_bubble("1f1b", 4, 8) - 1e-9
    assert timing.bubble_fraction < theoretical_bubble("1f1b", 4, 8) + 0.1


@pytest.mark.timeout(120)
def test_train_prints_the_prediction_then_measured_values_and_how_to_calibrate(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("RINGPIPE_MACHINE", str(tmp_path / "machine.json"))  # no machine file: uncalibrated
    result = run_cli("train", "--data", corpus, "--tokenizer", "char", "--n-layer", 2, "--n-head", 2, "--n-embd", 32,
                     "--block-size", 16, "--batch-size", 4, "--steps", 2, "--eval-iters", 1, "--nproc", 2, "--dp", 2,
                     "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    plan_lines = [line for line in result.output.splitlines() if line.startswith("plan: ")]
    assert plan_lines[0].startswith("plan: dp2 tp1 pp1 mb1 — most-loaded rank pp0: ")
    assert "run `ringpipe plan --calibrate`" in plan_lines[1]
    assert "ms measured" in plan_lines[2] and "no prediction (uncalibrated)" in plan_lines[2]


def test_a_calibrated_machine_predicts_from_its_measured_pieces():
    inventory = GPT2Inventory(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    from ringpipe.model.planning.step_time import architecture_key

    pieces = {"block|4": {"forward": 1.0, "backward_input": 2.0, "backward_weight": 0.5},
              "head|4": {"forward": 0.25, "backward_input": 0.5, "backward_weight": 0.0},
              "embedding|4": {"forward": 0.125, "backward_input": 0.125, "backward_weight": 0.0}}
    machine = load_machine("h100-8x-node")
    machine.calibration = {"compute": {"model": architecture_key(inventory), "pieces": pieces,
                                       "optimizer_seconds_per_element": 0.0}}
    timing = predict_step(inventory, Candidate(), 4, machine)
    assert timing.seconds == pytest.approx(3 * 3.5 + 0.75 + 0.25)
    # recompute: one more forward where the calibration did not time it, else the measured rebuild
    assert predict_step(inventory, Candidate(recompute=True), 4, machine).seconds == pytest.approx(3 * 4.5 + 1.0)
    pieces["block|4"]["backward_input_recompute"] = 3.75
    assert predict_step(inventory, Candidate(recompute=True), 4, machine).seconds == pytest.approx(3 * 5.25 + 1.0)


def test_a_shared_cpu_host_slows_compute_by_the_share_of_cores_the_ranks_get():
    machine = load_machine("h100-8x-node")
    machine.kind, machine.cores, machine.calibration = "cpu", 2, {"load_average": 1.0}
    assert machine.oversubscription(1, background_load=0.0) == 1.0
    assert machine.oversubscription(4, background_load=0.0) == 2.0
    # 2 cores among 8 runnable processes, against 7 for the lone probe; the probe ran 3.5× slower
    assert machine.oversubscription(2, background_load=6.0, probe_ratio=3.5) == pytest.approx(4.0)


def test_calibration_times_each_piece_of_the_model_at_the_rows_asked():
    from ringpipe.tools.plan_calibration import calibrate_compute

    inventory = GPT2Inventory(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    compute = calibrate_compute(inventory, [1, 2])
    assert set(compute["pieces"]) == {f"{piece}|{rows}" for piece in ("block", "head", "embedding") for rows in (1, 2)}
    assert all(seconds >= 0 for piece in compute["pieces"].values() for seconds in piece.values())
    assert compute["pieces"]["block|2"]["backward_input_recompute"] > 0
    assert compute["matmul_flops"] > 0 and compute["optimizer_seconds_per_element"] > 0
    assert set(compute["gradient_pass_seconds"]) == {"zero", "accumulate"}
    assert all(seconds > 0 for seconds in compute["gradient_pass_seconds"].values())


def test_the_planners_flops_are_narayanan_et_als_with_the_recomputed_forward():
    from ringpipe.tools.bench_plan_published import SEQUENCE, VOCAB, paper_flops

    B, layers, hidden = 3072, 128, 25600
    inventory = GPT2Inventory(GPTConfig(n_layer=layers, n_head=160, n_embd=hidden, block_size=SEQUENCE,
                                        vocab_size=VOCAB, dtype="float16"), attention_kernel=False)
    planner = 4 * layers * inventory.block_flops(B, SEQUENCE) + 3 * inventory.head_flops(B, SEQUENCE)
    assert planner == pytest.approx(paper_flops(B, layers, hidden), rel=1e-12)


def test_sizes_read_in_the_unit_that_suits_them():
    from ringpipe.cluster.plan_cmd import size

    assert [size(n) for n in (512, 3 << 10, 37.5 * 2**20, 999 * 2**20, 14.84 * 2**30)] == \
        ["512 B", "3.00 KiB", "37.5 MiB", "999 MiB", "14.8 GiB"]
    result = run_cli("plan", *SMALL, "--nproc", 2, "--top", 1)
    row = next(line for line in result.output.splitlines() if line.strip().startswith("1 "))
    assert " MiB = W " in row and "GiB" not in row


def test_plan_model_bert_ranks_bert_layouts_without_recompute(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("plan", "--model", "bert", *SMALL, "--nproc", 2, "--top", 50, "--json", out)
    assert result.exit_code == 0, result.output
    layouts = json.loads(out.read_text())["layouts"]
    assert layouts and not any(entry["layout"]["recompute"] for entry in layouts)


def test_plan_model_t5_ranks_t5_layouts_and_refuses_sequence_parallel():
    result = run_cli("plan", "--model", "t5", *SMALL, "--nproc", 2, "--top", 3, "--show-refused")
    assert result.exit_code == 0, result.output
    assert " wins: " in result.output
    assert "sequence parallel: not implemented for t5" in result.output


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_calibration_times_every_familys_pieces_and_the_planner_predicts_from_them(name):
    import dataclasses

    from ringpipe.model.families import family
    from ringpipe.model.planning.family import inventory_for
    from ringpipe.model.planning.step_time import architecture_key
    from ringpipe.tools.plan_calibration import calibrate_compute

    model = family(name)
    inventory = inventory_for(name, model.config(**dataclasses.asdict(model.default_options()), vocab_size=300))
    compute = calibrate_compute(inventory, [1])
    pieces = compute["pieces"]
    assert set(pieces) == {"block|1", "head|1", "embedding|1"}
    assert pieces["block|1"]["forward"] > 0 and pieces["block|1"]["backward_input"] > 0
    assert pieces["head|1"]["forward"] > 0 and pieces["embedding|1"]["backward_input"] > 0
    machine = load_machine("h100-8x-node")
    machine.calibration = {"compute": {**compute, "model": architecture_key(inventory), "optimizer_seconds_per_element": 1e-30,
                                       "gradient_pass_seconds": {"zero": 0.0, "accumulate": 0.0}}}
    expected = (inventory.plan.num_layers * sum(pieces["block|1"][k] for k in ("forward", "backward_input", "backward_weight"))
                + sum(pieces[p]["forward"] + pieces[p]["backward_input"] for p in ("head|1", "embedding|1")))
    assert predict_step(inventory, Candidate(), 1, machine).seconds == pytest.approx(expected, rel=1e-6)
