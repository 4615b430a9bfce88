"""Run every fault and bad-input test and write docs/reliability.md: one row per case with its result.

Usage: .venv/bin/python benchmarks/reliability_report.py [--out docs/reliability.md]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# test file -> (area, what a pass means)
AREAS = {
    "test_reliability": ("crash, disk, signals, checkpoints", "recovered or refused cleanly"),
    "test_data": ("dataset files", "refused cleanly with one error naming the file"),
    "test_engine": ("config, CLI and divergence", "exit 2 with one line / guard recovered, no NaN written"),
    "test_report": ("user images and exports", "clear error or documented conversion"),
    "test_dist": ("torchrun", "recovered / clear error"),
    "test_models": ("model names and options", "one line naming the valid choices"),
    "test_studies": ("studies", "stopped cleanly and resumed, or refused in one line"),
    "test_warm_start": ("model.init", "refused in one line / resumed without its source"),
    "test_own_models": ("models of your own", "refused in one line naming the cause"),
    "test_lesion": ("lesion study", "refused in one line"),
    "test_rewrites": ("model rewrites", "refused in one line naming the choices"),
    "test_gemm_conv": ("bf16 convolutions as GEMMs", "resumed bit-identical"),
    "test_d2l": ("the notebook's names", "one line naming the argument"),
    "test_bench": ("benchmarks", "refused in one line / measurements kept / kills told from errors"),
}
# tests whose meaning is not their module's: memory let go rather than bad input refused
RELEASED = ("memory", "what is no longer needed is freed, not held as long as the command runs")
TESTS = {
    "test_counting_activations_lets_the_model_go": RELEASED,
    "test_each_epochs_rollback_copy_replaces_the_last_one_not_beside_it": RELEASED,
    "test_a_resumed_run_lets_its_checkpoint_go_once_restored": RELEASED,
    "test_a_convolution_striding_past_its_input_gets_the_right_weight_gradient_in_bf16": (
        "bf16 convolutions as GEMMs",
        "gradients as close to fp32's as PyTorch's reference bf16 kernels, where oneDNN's are NaN or wrong",
    ),
    "test_load_model_holds_the_model_not_the_checkpoint": RELEASED,
}
SELECT = [
    "tests/test_reliability.py",
    # the dataset files' faults (the rest of test_data.py tests the pipeline's arithmetic)
    "tests/test_data.py::test_reads_gzip_and_raw",
    "tests/test_data.py::test_each_corruption_gives_its_own_clear_error",
    "tests/test_data.py::test_gzip_faults",
    "tests/test_data.py::test_pair_checks",
    "tests/test_data.py::test_fuzz_any_bytes_give_an_array_or_the_readers_error",
    "tests/test_data.py::test_fuzz_valid_header_with_random_payload",
    "tests/test_data.py::test_user_directory_is_validated_by_structure",
    "tests/test_data.py::test_idx_data_of_one_class_or_of_two_sizes_is_refused",
    "tests/test_data.py::test_missing_file_and_nothing_found",
    "tests/test_data.py::test_download_writes_verified_files_atomically",
    "tests/test_data.py::test_real_fashion_mnist_files",
    "tests/test_engine.py::test_config_errors_exit_2_and_write_nothing",
    "tests/test_engine.py::test_recipes_are_found_by_name_from_any_directory",
    "tests/test_engine.py::test_missing_config_file_and_bad_yaml",
    "tests/test_engine.py::test_a_key_given_twice_in_a_config_file_is_refused",
    "tests/test_engine.py::test_a_config_file_lays_its_keys_over_the_base_it_names",
    "tests/test_engine.py::test_sizes_known_once_the_data_is_read_are_checked_before_any_write",
    "tests/test_engine.py::test_reslab_sgd_refuses_what_torch_sgd_refuses_with_its_message",
    "tests/test_models.py::test_bad_names_and_options_list_the_choices",
    "tests/test_models.py::test_summary_of_a_recipe_builds_its_model_with_its_options",
    "tests/test_models.py::test_a_stride_above_the_images_side_is_one_line",
    "tests/test_models.py::test_a_builders_own_check_from_a_config_names_its_keys_before_data_loads",
    "tests/test_models.py::test_counting_activations_lets_the_model_go",
    "tests/test_engine.py::test_guard_rolls_back_and_halves_the_lr_on_injected_nan",
    "tests/test_engine.py::test_each_epochs_rollback_copy_replaces_the_last_one_not_beside_it",
    "tests/test_engine.py::test_a_resumed_run_lets_its_checkpoint_go_once_restored",
    "tests/test_report.py::test_load_model_holds_the_model_not_the_checkpoint",
    "tests/test_engine.py::test_hopeless_run_stops_cleanly",
    "tests/test_engine.py::test_seed_recipe_with_absurd_lr_never_writes_nan",
    "tests/test_engine.py::test_resume_after_a_crash_is_bit_identical",
    "tests/test_engine.py::test_mid_epoch_checkpoint_resume_is_bit_identical",
    "tests/test_engine.py::test_save_every_writes_last_pt_every_n_epochs_and_a_resume_replays_the_rest",
    "tests/test_engine.py::test_a_resume_names_its_changes_and_refuses_new_batches_mid_epoch",
    "tests/test_engine.py::test_failed_checkpoint_write_keeps_the_previous_one",
    "tests/test_report.py::test_bad_image_files_give_one_clear_error",
    "tests/test_report.py::test_huge_image_is_refused_and_nothing_else_said",
    "tests/test_report.py::test_a_huge_image_in_a_folder_is_one_line",
    "tests/test_report.py::test_outputs_that_cannot_be_written_and_counts_out_of_range_are_one_line",
    "tests/test_report.py::test_failed_export_leaves_the_previous_file",
    "tests/test_report.py::test_every_export_format_matches_pytorch_and_is_not_taken_for_a_checkpoint",
    "tests/test_report.py::test_a_plot_in_a_format_matplotlib_cannot_write_is_one_line",
    "tests/test_report.py::test_an_evaluation_batch_that_cannot_fit_in_memory_is_one_line_and_a_smaller_one_scores_the_same",
    "tests/test_report.py::test_predict_classifies_many_files_in_the_runs_evaluation_batches",
    "tests/test_report.py::test_a_folder_of_images_with_a_constant_channel_trains",
    "tests/test_studies.py::test_a_study_stopped_by_sigterm_says_to_run_it_again_and_then_finishes",
    "tests/test_studies.py::test_a_study_refuses_to_be_told_what_it_sets_itself",
    "tests/test_studies.py::test_a_study_run_again_with_other_settings_refuses_its_finished_runs",
    "tests/test_report.py::test_image_modes_are_converted",
    "tests/test_report.py::test_animated_gif_uses_the_first_frame",
    "tests/test_dist.py::test_kill_then_resume_under_torchrun_and_with_another_world_size",
    "tests/test_dist.py::test_sync_bn_on_cpu_is_a_clear_error",
    "tests/test_warm_start.py::test_another_architecture_is_refused",
    "tests/test_warm_start.py::test_a_bad_source_is_one_line_and_nothing_written",
    "tests/test_warm_start.py::test_a_run_starts_from_init_and_a_resume_does_not_read_it_again",
    "tests/test_own_models.py::test_register_refuses_what_would_fail_later",
    "tests/test_own_models.py::test_a_module_that_cannot_be_imported_is_one_line",
    "tests/test_own_models.py::test_a_model_that_cannot_train_on_the_data_is_one_line_before_any_write",
    "tests/test_own_models.py::test_a_model_that_cannot_be_traced_is_one_line_on_export_and_no_file",
    "tests/test_own_models.py::test_a_model_of_your_own_resumes_bit_identical_after_a_crash",
    "tests/test_engine.py::test_a_run_resumed_mid_epoch_rolls_back_to_the_epochs_start_as_the_uninterrupted_one",
    "tests/test_engine.py::test_a_mid_epoch_checkpoint_without_cuda_generators_resumes",
    "tests/test_engine.py::test_a_resume_trains_with_changed_optimiser_settings_and_refuses_another_optimiser_or_model",
    "tests/test_engine.py::test_grad_scaler_path_skips_overflow_but_stops_on_nan_loss",
    "tests/test_engine.py::test_reslab_sgd_zeroes_or_drops_gradients_and_refuses_a_state_of_another_shape",
    "tests/test_engine.py::test_curves_are_drawn_every_curves_every_seconds_at_the_end_and_after_an_error",
    "tests/test_dist.py::test_a_run_resumed_on_three_ranks_ends_the_same_bits",
    "tests/test_dist.py::test_a_nan_on_one_rank_rolls_back_every_rank_and_so_does_a_run_resumed_mid_epoch",
    "tests/test_dist.py::test_a_script_that_calls_fit_twice_under_torchrun_trains_both_in_one_process_group",
    "tests/test_dist.py::test_a_group_the_script_joined_that_cannot_carry_the_runs_tensors_is_one_line_before_any_write",
    "tests/test_report.py::test_folder_dataset_round_trip",
    "tests/test_report.py::test_eval_on_cuda_without_a_gpu_is_one_line",
    "tests/test_report.py::test_cli_onnx_export_says_one_line",
    "tests/test_report.py::test_a_figure_that_fails_halfway_leaves_the_old_picture",
    "tests/test_report.py::test_a_folder_is_colour_when_any_image_is",
    "tests/test_report.py::test_a_folders_hidden_and_empty_class_folders",
    "tests/test_report.py::test_runs_lists_each_run_directory_with_its_state",
    "tests/test_report.py::test_runs_list_hand_edited_files_in_their_rows_without_a_traceback",
    "tests/test_data.py::test_a_download_cut_short_says_so_and_keeps_nothing",
    "tests/test_engine.py::test_what_the_system_refuses_unchecked_is_one_line",
    "tests/test_dist.py::test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint",
    "tests/test_dist.py::test_a_rank_whose_peer_died_says_so_in_one_line",
    "tests/test_dist.py::test_two_machines_train_as_two_ranks_and_one_that_lacks_the_run_stops_both_at_once",
    "tests/test_dist.py::test_a_rank_that_stops_before_the_ranks_meet_stops_those_that_wait_for_it",
    "tests/test_dist.py::test_a_signal_that_comes_as_the_ranks_leave_with_their_checkpoint_lets_them_say_so",
    "tests/test_dist.py::test_a_dist_timeout_that_is_not_a_number_of_seconds_is_refused",
    "tests/test_dist.py::test_a_collective_that_timed_out_is_one_line",
    "tests/test_dist.py::test_an_error_line_goes_into_the_file_torchrun_reads_each_failed_ranks_reason_from",
    "tests/test_dist.py::test_an_error_line_is_one_write_so_the_ranks_lines_do_not_splice",
    "tests/test_engine.py::test_micro_batches_accumulate_the_whole_batchs_step",
    "tests/test_studies.py::test_study_cli_rejects_bad_depths_before_training",
    "tests/test_warm_start.py::test_weights_that_are_not_tensors_are_refused",
    "tests/test_lesion.py::test_a_k_the_study_does_not_draw_is_refused_in_one_line",
    "tests/test_lesion.py::test_a_run_directory_without_weights_is_refused_in_one_line",
    "tests/test_rewrites.py::test_speed_up_skips_the_named_rewrite_and_refuses_a_name_it_does_not_know",
    "tests/test_gemm_conv.py::test_a_bf16_run_through_gemm_convs_resumes_bit_identical",
    "tests/test_gemm_conv.py::test_a_convolution_striding_past_its_input_gets_the_right_weight_gradient_in_bf16",
    "tests/test_d2l.py::test_notebook_loader_names_a_bad_argument",
    "tests/test_d2l.py::test_notebook_loader_refuses_a_batch_larger_than_the_training_set",
    "tests/test_bench.py::test_bench_refuses_a_seed_comparison_of_nothing_and_its_options_with_quick",
    "tests/test_bench.py::test_a_late_failure_keeps_the_measurements_already_written",
    "tests/test_bench.py::test_resume_fuzz_tells_a_kill_under_torchrun_from_an_error",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *SELECT],
            cwd=ROOT,
            check=False,
        )
        seconds = time.perf_counter() - start
        cases = ET.parse(xml).getroot().iter("testcase")
        rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
        for case in cases:
            module = case.get("classname", "").rsplit(".", 1)[-1]
            area, meaning = TESTS.get(case.get("name", ""), AREAS.get(module, (module, "")))
            if case.find("failure") is not None or case.find("error") is not None:
                result = "FAILED"
                counts["failed"] += 1
            elif case.find("skipped") is not None:
                result = "skipped: " + (case.find("skipped").get("message") or "")
                counts["skipped"] += 1
            else:
                result = f"pass: {meaning}"
                counts["passed"] += 1
            rows.append(f"| {area} | `{case.get('name')}` | {result} |")
    from reslab.studies.common import machine

    m = machine()
    lines = [
        "# Reliability: faults, hostile files and bad input",
        "",
        "Every row is one test case of the suite (tests/), run by `.venv/bin/python benchmarks/reliability_report.py`,",
        f"which wrote this page on {m['cores']} cores of an {m['cpu']} ({platform.machine()}, Python {m['python']}, "
        f"PyTorch {m['torch']})",
        f"in {seconds:.0f} s: **{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped**.",
        "",
        "Kill points of the SIGKILL tests: before the first checkpoint, mid-epoch 1, mid-epoch 2, during the first",
        "evaluation, during the first and the third checkpoint write (temp file complete, not yet renamed), after a",
        "checkpoint but before metrics.jsonl (mid-run, and after the last epoch's last.pt, before its summary), and",
        "between epochs. Each resumed run must end bit-identical (weights, EMA weights, metrics, best.pt) to an",
        "uninterrupted one.",
        "",
        "| area | case | result |",
        "|---|---|---|",
        *rows,
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}: {counts}")
    sys.exit(1 if counts["failed"] else 0)


if __name__ == "__main__":
    main()
